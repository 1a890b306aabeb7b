"""What went wrong, read from a tritonserver log: the lines an operator needs in a one-line error."""

from __future__ import annotations

import re
from typing import List

# Triton log lines that are errors but only say "no GPU here"; hidden from messages.
_NOISE = ("CudaDriverHelper", "NVML", "DCGM")
_LOG_PREFIX = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")


def log_errors(text: str, limit: int = 6) -> List[str]:
    """The error lines of a tritonserver log, without timestamps and GPU-absence noise.

    A model load failure appears as one E line ("failed to load 'NAME' version
    1: Internal: RuntimeError: ...") whose traceback is escaped as literal
    "\\n"; we keep what comes before the traceback.
    """
    found: List[str] = []
    for line in text.splitlines():
        if not (line.startswith("E") and _LOG_PREFIX.match(line)) and not line.startswith("error:"):
            continue
        if any(noise in line for noise in _NOISE):
            continue
        message = _LOG_PREFIX.sub("", line).strip().strip('"').split("\\n")[0].strip()
        if message and message not in found:
            found.append(message)
    return found[:limit]
