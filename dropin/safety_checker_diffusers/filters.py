"""What a flagged image becomes: black (as diffusers), a strong blur, large blocks, or left as it is."""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

ACTIONS = ("black", "blur", "pixelate", "none")
PIXELATE_BLOCKS = 16  # blocks along the shorter side
BLUR_FRACTION = 1 / 20  # box radius as a fraction of the shorter side; three passes approximate a Gaussian
BLUR_PASSES = 3


def is_torch(value: Any) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach")


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


def replaced(image: Any, action: str) -> Any:
    """A flagged image after `action`: a torch image from the VAE ([-1, 1]) or a numpy one ([0, 1])."""
    if is_torch(image):
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
