"""One record per image: the JSON object `check` prints and scan writes to its report.

An answered image's record holds every answer field (CheckResult.as_dict) and "error": null; any other's holds "error"
and never "flagged", so no reader can take a failure for "not flagged". Scan adds "size" and "sha256" after "path".
"""

from __future__ import annotations

from typing import Dict, Optional, Union

from safety_checker_client.client import CheckResult
from safety_checker_client.errors import CheckError

Record = Dict[str, object]


def record(
    path: str, result: Optional[CheckResult] = None, error: Union[BaseException, str, None] = None, **extra: object
) -> Record:
    """The record of `path`: its answer, or why it has none ("not checked" when nothing says)."""
    if result is None:
        return {"path": path, **extra, "error": error_text(path, error)}
    return {"path": path, **extra, **result.as_dict(), "error": None}


def error_text(path: str, error: Union[BaseException, str, None]) -> str:
    """What a record says of a failure; a refusal naming the image is prefixed with the file's path."""
    if error is None:
        return "not checked"
    if isinstance(error, CheckError) and error.index is not None:
        return f"{path}: {error}"
    return str(error)


def answered(line: Record) -> bool:
    """A record with an answer: `flagged` is true or false and there is no error."""
    return isinstance(line.get("flagged"), bool) and not line.get("error")
