"""The one error a check raises: what happened, which image a refusal names, and whether to send again.

Every tritonclient or socket exception is classified here, once, by `CheckError.from_exception`; the client, `check`,
`scan` and the drop-in read `.kind`, `.index`, `.retryable` and `.unreachable`, never a message's text.
"""

from __future__ import annotations

import errno
import re
import socket
from typing import Optional

from safety_checker_client.strictness import StrictnessError

REFUSED = "refused"  # the server (or the rule it applies) refused the request for what it holds
UNAVAILABLE = "unavailable"  # unreachable, refused connection, timeout, overloaded, restarting
INTERNAL = "internal"  # the server failed while answering
KINDS = (REFUSED, UNAVAILABLE, INTERNAL)

# tritonclient's statuses (gRPC status names, HTTP codes) of a server that could not answer now.
_GRPC_UNAVAILABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
_UNAVAILABLE_STATUSES = {f"StatusCode.{name}" for name in _GRPC_UNAVAILABLE} | {"429", "502", "503", "504"}
_INTERNAL_STATUSES = {"StatusCode.INTERNAL", "StatusCode.UNKNOWN", "500"}
# Any other status (INVALID_ARGUMENT/400, an unknown model, ...) refuses the request as it is.

# How the served models name the element they refused: "image 3: ...", its index in the request.
_REFUSED_INDEX = re.compile(r"\bimage (\d+): ")
# gRPC's words (status UNAVAILABLE) when no connection could be made; HTTP raises the socket's OSError.
_NO_CONNECTION = re.compile(r"failed to connect|errors? resolving|DNS resolution failed|Connection refused", re.I)
_NO_CONNECTION_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}


class CheckError(RuntimeError):
    """No answer for the images of a request: `kind` says why, `index` which image a refusal names, `unreachable` that
    no connection could be made (nothing listens there, or its name does not resolve; always UNAVAILABLE)."""

    def __init__(self, message: str, kind: str, index: Optional[int] = None, unreachable: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        super().__init__(message)
        self.kind, self.index, self.unreachable = kind, index, unreachable and kind == UNAVAILABLE

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may get an answer (never for a refusal)."""
        return self.kind != REFUSED

    @classmethod
    def from_exception(cls, error: BaseException, where: str) -> CheckError:
        """`error` (tritonclient's, a socket's, a strictness rule's) as a CheckError whose message starts `where`."""
        if isinstance(error, CheckError):
            return error
        if isinstance(error, StrictnessError):
            # The rule the server applies, applied before sending: refused with the server's own words.
            return cls(f"{where}: {error}", REFUSED)
        status = getattr(error, "status", None)
        message = getattr(error, "message", None)
        if callable(status) and callable(message):  # tritonclient's InferenceServerException
            text, code = str(message()), status()
            unreachable = str(code) == "StatusCode.UNAVAILABLE" and bool(_NO_CONNECTION.search(text))
            if code is None:  # tritonclient refused the request itself, before sending it
                kind = REFUSED
            elif str(code) in _UNAVAILABLE_STATUSES:
                kind = UNAVAILABLE
            elif str(code) in _INTERNAL_STATUSES:
                kind = INTERNAL
            else:
                kind = REFUSED
        else:  # connection refused or reset, timeouts: tritonclient lets several types through
            text, kind = str(error) or type(error).__name__, UNAVAILABLE
            unreachable = isinstance(error, socket.gaierror) or getattr(error, "errno", None) in _NO_CONNECTION_ERRNOS
        named = _REFUSED_INDEX.search(text) if kind == REFUSED else None
        return cls(f"{where}: {text}", kind, None if named is None else int(named.group(1)), unreachable)
