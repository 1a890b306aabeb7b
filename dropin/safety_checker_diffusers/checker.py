"""`TritonSafetyChecker`: what diffusers' pipeline calls as its safety checker, answered by the served checker.

The pipeline keeps its own `feature_extractor`: `run_safety_checker` makes
the CLIP `pixel_values` as always and calls this object exactly as it calls
diffusers' checker, `(images=..., clip_input=...)`. The pixel values (any
float dtype, any device) go to the `safety_checker` ensemble as float32; the
answer is `(images, has_nsfw_concepts)` as diffusers returns it, with each
flagged image replaced according to `action` (see filters.py).

It fails closed: an image the server did not answer makes the call raise
the client's `CheckError` (with `on_error="block"` that image is blacked out
and reported as flagged instead). It never reports an image as not flagged
without the server's answer for it.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import numpy as np

from safety_checker_client.client import (
    CONNECT_DEADLINE_S,
    RECORD_OUTPUTS,
    CheckError,
    CheckResult,
    SafetyCheckerClient,
    Strictness,
)
from safety_checker_diffusers.filters import ACTIONS, is_torch, replaced

ON_ERROR = ("raise", "block")
# How long one request may take, retries included, by default: a pipeline waits seconds for a failing server, not
# minutes (a CPU server answers a pipeline's few images well within it).
TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


def _pixel_values(clip_input: Any) -> np.ndarray:
    """clip_input as float32 numpy [N, 3, 224, 224], from torch (any float dtype, any device) or numpy."""
    if is_torch(clip_input):
        return np.ascontiguousarray(clip_input.detach().float().cpu().numpy(), dtype=np.float32)
    if isinstance(clip_input, np.ndarray):
        return np.ascontiguousarray(clip_input, dtype=np.float32)
    raise TypeError(f"clip_input must be a torch tensor or a numpy array, not {type(clip_input).__name__}")


class TritonSafetyChecker:
    """`pipe.safety_checker = TritonSafetyChecker(url, protocol="grpc", action="black", strictness=None)`.

    `strictness`: a preset name or an adjustment for every request (None: the
    server's configured preset; one the server would refuse is a refusal,
    CheckError, for every image). `on_error`: "raise" (default) or "block".
    After each call, `last_results` holds the server's answer per image
    (scores, fired concepts; None for an image blocked for want of one).

    How long a call may wait (the client's arguments): `timeout_s` for one
    attempt (default 30 s), `deadline_s` for a request and its retries while
    a server that answered before fails or restarts (default: `timeout_s`),
    and `connect_deadline_s` (default 20 s) while nothing listens at `url`
    at all, so a wrong URL fails a pipeline's call in seconds. Then the call
    raises CheckError (or blocks the images, with `on_error="block"`).
    """

    def __init__(
        self,
        url: Optional[str] = None,
        protocol: str = "grpc",
        action: str = "black",
        strictness: Strictness = None,
        on_error: str = "raise",
        timeout_s: Optional[float] = TIMEOUT_S,
        deadline_s: Optional[float] = None,
        connect_deadline_s: float = CONNECT_DEADLINE_S,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        self.action = action
        self.strictness = strictness
        self.on_error = on_error
        self.client = SafetyCheckerClient(
            url,
            protocol=protocol,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            connect_deadline_s=connect_deadline_s,
            outputs=RECORD_OUTPUTS,
        )
        self.last_results: List[Optional[CheckResult]] = []

    def __repr__(self) -> str:
        return f"TritonSafetyChecker({self.client.url!r}, protocol={self.client.protocol!r}, action={self.action!r})"

    def close(self) -> None:
        self.client.close()

    def __call__(self, clip_input: Any = None, images: Any = None) -> Tuple[Any, List[bool]]:
        """What the pipeline calls: `safety_checker(images=..., clip_input=...)`, like diffusers' forward()."""
        return self.forward(clip_input, images)

    def forward(self, clip_input: Any, images: Any) -> Tuple[Any, List[bool]]:
        pixels = _pixel_values(clip_input)
        count = len(images)
        if len(pixels) != count:
            raise ValueError(f"clip_input holds {len(pixels)} images but images holds {count}")
        self.last_results = []
        outcomes = self.client.check_each(pixels, self.strictness)
        failures = [outcome for outcome in outcomes if isinstance(outcome, CheckError)]
        if failures:
            if self.on_error == "raise":
                raise failures[0]
            logger.warning(
                "The safety checker server did not answer %d of %d images (%s); they are blocked.",
                len(failures),
                count,
                failures[0],
            )
        self.last_results = [outcome if isinstance(outcome, CheckResult) else None for outcome in outcomes]
        flags = [result is None or bool(result.flagged) for result in self.last_results]
        if any(result is not None and result.flagged for result in self.last_results):
            logger.warning(
                "Potential NSFW content was detected in one or more images (action %r). "
                "Try again with a different prompt and/or seed.",
                self.action,
            )
        # Replaced in place, as diffusers' checker does (a batch or a list of images); blocked ones go black.
        for index, result in enumerate(self.last_results):
            if result is None or result.flagged:
                images[index] = replaced(images[index], "black" if result is None else self.action)
        return images, flags
