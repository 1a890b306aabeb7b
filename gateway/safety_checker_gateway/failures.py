"""Every answer that is not a decision: one error type, and the JSON each protocol's callers expect.

The KServe routes answer `{"error": message}` (as the KServe runtime did);
/v1 answers OpenAI's `{"error": {"message", "type", "param", "code"}}`. An
upstream failure is always a 5xx, so that a fail-closed caller blocks, and
its text never carries Triton's address or an image's bytes.
"""

from __future__ import annotations

from typing import Dict, Optional

from starlette.responses import JSONResponse

from safety_checker_client.errors import REFUSED, UNAVAILABLE, CheckError
from safety_checker_gateway.settings import RETRY_AFTER_S

# Triton puts this before the words of the ensemble step that refused a request; a caller needs only the words.
_ENSEMBLE_PREFIX = "in ensemble '"


class RequestError(Exception):
    """A request answered without a decision: its HTTP status, and what the caller is told."""

    def __init__(
        self, status: int, message: str, param: Optional[str] = None, headers: Optional[Dict[str, str]] = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


def bad_request(message: str, param: Optional[str] = None) -> RequestError:
    return RequestError(400, message, param)


def overloaded(status: int) -> RequestError:
    return RequestError(
        status,
        f"the gateway is checking as many requests as it may; nothing was checked: send again in {RETRY_AFTER_S} s",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def from_check_error(error: CheckError) -> RequestError:
    """Triton's failure as the caller's error: a refusal is 400 with Triton's words, any other failure a 5xx."""
    if error.kind == REFUSED:
        text = str(error).removeprefix("triton: ")
        if text.startswith(_ENSEMBLE_PREFIX) and "', " in text:
            text = text.split("', ", 1)[1]
        return bad_request(text, "input")
    if error.kind == UNAVAILABLE:
        return RequestError(
            503,
            "the safety checker is unavailable; nothing was checked: send again later",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return RequestError(502, "the safety checker failed while answering; nothing was checked")


_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}
_OPENAI_TYPES.update({413: "invalid_request_error", 429: "rate_limit_exceeded"})


def error_response(path: str, error: RequestError) -> JSONResponse:
    """The error in the JSON of the protocol `path` belongs to."""
    if path.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(error.status, "server_error")
        code = "invalid_api_key" if error.status == 401 else None
        body: Dict[str, object] = {
            "error": {"message": error.message, "type": kind, "param": error.param, "code": code}
        }
    else:
        body = {"error": error.message}
    return JSONResponse(body, status_code=error.status, headers=error.headers)
