"""The answer to one request a model failed on unexpectedly: it fails that request alone, and says nothing more.

Every Python model answers a request that broke its code (not a request
refused for what it holds, which is INVALID_ARG) with INTERNAL and a message
that names no path, exception or value; the log names what failed and the
exception's type, never image data.
"""

import triton_python_backend_utils as pb_utils


def failed_request(what: str, error: Exception, verb: str = "answer"):
    """The INTERNAL response for a request on which `what` (e.g. "scoring a request") raised `error`."""
    pb_utils.Logger.log_error(f"{what} failed unexpectedly ({type(error).__name__})")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"the server failed to {verb} this request; nothing in it was checked")
    )
