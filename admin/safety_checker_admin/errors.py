"""The operator package's one error type."""

from __future__ import annotations


class ServerError(RuntimeError):
    """tritonserver could not start or stopped serving, or was asked for with bad settings; the message says why.

    Raised instead of hanging: a taken port, a missing repository, a model
    that fails to load (its error from the server log is in the message), a
    start-up timeout, an admin key that Triton's command line cannot carry.
    """
