"""A drop-in for diffusers' `StableDiffusionSafetyChecker` that asks the served checker instead.

    from safety_checker_client.diffusers import TritonSafetyChecker

    pipe.safety_checker = TritonSafetyChecker("triton:8001", protocol="grpc", action="black", strictness=None)

The pipeline keeps its own `feature_extractor`: `run_safety_checker` makes
the CLIP `pixel_values` as always and calls this object exactly as it calls
diffusers' checker, `(images=..., clip_input=...)`. The pixel values (any
float dtype, any device) go to the `safety_checker` ensemble as float32; the
answer is `(images, has_nsfw_concepts)` as diffusers returns it, with each
flagged image replaced according to `action`:

- "black": zeros, exactly as diffusers does (the pipeline then shows black);
- "blur": a strong blur of the image;
- "pixelate": 16 blocks along the shorter side;
- "none": the image is left as it is (only `has_nsfw_concepts` tells).

Images come as the pipeline passes them: a torch tensor [N, C, H, W] fresh
from the VAE, in [-1, 1], or numpy [N, H, W, C] in [0, 1] (older
pipelines). The pipeline does not denormalise images it was told are
flagged, so a flagged torch image that is blurred, pixelated or kept
("none") comes back already in [0, 1], and the user sees the picture they
asked for.

It fails closed: when the server cannot be reached or does not answer, the
call raises `CheckError` (with `on_error="block"` it blacks out every image
and reports every one as flagged instead). It never reports an image as not
flagged without the server's answer for it.

Neither torch nor diffusers is a dependency: torch is imported only when the
caller passes torch tensors, and diffusers never.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from safety_checker_client.client import CheckError, CheckResult, SafetyCheckerClient, Strictness

ACTIONS = ("black", "blur", "pixelate", "none")
ON_ERROR = ("raise", "block")
PIXELATE_BLOCKS = 16  # blocks along the shorter side
BLUR_FRACTION = 1 / 20  # box radius as a fraction of the shorter side; three passes approximate a Gaussian
BLUR_PASSES = 3

logger = logging.getLogger(__name__)


def _is_torch(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


def _pixel_values(clip_input: Any) -> np.ndarray:
    """clip_input as float32 numpy [N, 3, 224, 224], from torch (any float dtype, any device) or numpy."""
    if _is_torch(clip_input):
        return np.ascontiguousarray(clip_input.detach().float().cpu().numpy(), dtype=np.float32)
    if isinstance(clip_input, np.ndarray):
        return np.ascontiguousarray(clip_input, dtype=np.float32)
    raise TypeError(f"clip_input must be a torch tensor or a numpy array, not {type(clip_input).__name__}")


def _spatial_axes(image: np.ndarray, channels_first: bool) -> Tuple[int, int]:
    if image.ndim == 2:
        return (0, 1)
    if image.ndim != 3:
        raise ValueError(f"an image must be 2-D or 3-D, got shape {image.shape}")
    return (1, 2) if channels_first else (0, 1)


def _box_blur(image: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Mean over a window of 2 * radius + 1 along one axis, edges repeated."""
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius + 1, radius)
    padded = np.pad(image, pad, mode="edge")
    sums = np.cumsum(padded, axis=axis, dtype=np.float64)
    size = image.shape[axis]
    upper = np.take(sums, np.arange(2 * radius + 1, 2 * radius + 1 + size), axis=axis)
    lower = np.take(sums, np.arange(0, size), axis=axis)
    return ((upper - lower) / (2 * radius + 1)).astype(np.float32)


def blur(image: np.ndarray, channels_first: bool = False) -> np.ndarray:
    """A blur strong enough to hide what an image shows (float32 in, float32 out, same shape)."""
    axes = _spatial_axes(image, channels_first)
    radius = max(1, round(min(image.shape[a] for a in axes) * BLUR_FRACTION))
    result = image.astype(np.float32)
    for _ in range(BLUR_PASSES):
        for axis in axes:
            result = _box_blur(result, radius, axis)
    return result


def pixelate(image: np.ndarray, channels_first: bool = False, blocks: int = PIXELATE_BLOCKS) -> np.ndarray:
    """Each block of the image replaced by its mean; `blocks` blocks along the shorter side."""
    axes = _spatial_axes(image, channels_first)
    size = max(1, -(-min(image.shape[a] for a in axes) // blocks))
    result = image.astype(np.float64)
    for axis in axes:
        starts = np.arange(0, image.shape[axis], size)
        lengths = np.diff(np.append(starts, image.shape[axis]))
        means = np.add.reduceat(result, starts, axis=axis)
        shape = [1] * image.ndim
        shape[axis] = len(lengths)
        result = np.repeat(means / lengths.reshape(shape), lengths, axis=axis)
    return result.astype(np.float32)


class TritonSafetyChecker:
    """`pipe.safety_checker = TritonSafetyChecker(url, protocol="grpc", action="black", strictness=None)`.

    `strictness`: a preset name or an adjustment for every request (None: the
    server's configured preset). `on_error`: "raise" (default) or "block".
    After each call, `last_results` holds the server's full answer per image
    (scores, fired concepts).
    """

    def __init__(
        self,
        url: Optional[str] = None,
        protocol: str = "grpc",
        action: str = "black",
        strictness: Strictness = None,
        on_error: str = "raise",
        timeout_s: Optional[float] = 120.0,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        self.action = action
        self.strictness = strictness
        self.on_error = on_error
        self.client = SafetyCheckerClient(url, protocol=protocol, timeout_s=timeout_s)
        self.last_results: List[CheckResult] = []

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
        try:
            results = self.client.check_batch(pixels, self.strictness)
            if len(results) != count:
                raise CheckError(f"the server answered {len(results)} of {count} images")
        except CheckError as error:
            if self.on_error == "raise":
                raise
            logger.warning("The safety checker server did not answer (%s); every image is blocked.", error)
            flags = [True] * count
            return _replace(images, flags, "black"), flags
        self.last_results = results
        flags = [bool(result.flagged) for result in results]
        if any(flags):
            logger.warning(
                "Potential NSFW content was detected in one or more images (action %r). "
                "Try again with a different prompt and/or seed.",
                self.action,
            )
        return _replace(images, flags, self.action), flags


def _replace(images: Any, flags: Sequence[bool], action: str) -> Any:
    """Replace each flagged image in place, as diffusers' checker does (a batch or a list of images)."""
    for index, flagged in enumerate(flags):
        if flagged:
            images[index] = _replaced(images[index], action)
    return images


def _replaced(image: Any, action: str) -> Any:
    if _is_torch(image):
        import torch

        if action == "black":
            return torch.zeros_like(image)
        # A VAE image in [-1, 1], channels first; the pipeline will not denormalise a flagged image,
        # so it goes back in [0, 1] (diffusers' own arithmetic: x * 0.5 + 0.5, clamped).
        shown = (image.detach() * 0.5 + 0.5).clamp(0, 1)
        if action != "none":
            channels_first = image.ndim == 3 and image.shape[0] in (1, 3, 4)
            filtered = (blur if action == "blur" else pixelate)(shown.float().cpu().numpy(), channels_first)
            shown = torch.from_numpy(filtered)
        return shown.to(device=image.device, dtype=image.dtype)
    array = np.asarray(image)
    if action == "black":
        return np.zeros(array.shape, dtype=array.dtype)  # diffusers: np.zeros(images[idx].shape)
    if action == "none":
        return image
    channels_first = array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
    filtered = (blur if action == "blur" else pixelate)(array.astype(np.float32), channels_first)
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(np.round(filtered), np.iinfo(array.dtype).min, np.iinfo(array.dtype).max).astype(array.dtype)
    return filtered.astype(array.dtype)
