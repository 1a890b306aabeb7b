"""Turn images into the checker's `pixel_values`, exactly as transformers does.

The safety checker was trained on what `CLIPImageProcessor` makes of an image, so the client reproduces its PIL path
(`CLIPImageProcessorPil` in transformers 5) step by step with numpy and Pillow only, copying each step's arithmetic and
dtypes: RGB (transparency composited onto white), bicubic resize of the uint8 image to a shortest edge of 224, centre
crop to 224x224, scale by 1/255 in float64, cast to float32, normalise per channel in float32, channels first. The
result is bit-identical to the processor's `pixel_values`. Rescaling and normalising act on each uint8 value alone, so
they are a table lookup: `preprocess_uint8` stops before them, and the `safety_checker_uint8` ensemble applies the same
table on the server. Float arrays from a Stable Diffusion pipeline become uint8 the way diffusers'
`VaeImageProcessor.postprocess` makes the PIL images it hands to the checker.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from safety_checker_client.spec import IMAGE_SIZE, MAX_ASPECT_RATIO

# The feature extractor config of CompVis/stable-diffusion-safety-checker.
SHORTEST_EDGE = IMAGE_SIZE
CROP_SIZE = IMAGE_SIZE
RESAMPLE = Image.Resampling.BICUBIC
RESCALE_FACTOR = 1 / 255
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

ZERO_ONE = (0.0, 1.0)  # diffusers' output_type="np"
MINUS_ONE_ONE = (-1.0, 1.0)  # decoded latents
# How far a float may stray outside its stated range and still be clamped;
# anything further means the caller stated the wrong range.
RANGE_TOLERANCE = 1e-3

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_CHANNEL_COUNTS = (1, 3, 4)  # grayscale, RGB, RGBA

ImageLike = Union[Image.Image, np.ndarray]
"""A PIL image of any mode, or an array as `to_uint8_image` accepts it."""


class ImageError(ValueError):
    """An input that is not an image the checker can be given (an unreadable or corrupt file, an array of the wrong
    shape, dtype or value range): one `except` tells bad input from a failing server."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, upright as its EXIF tag says: the one picture the pixel path checks.

    Decoding it all makes a corrupt file fail here, naming it, not inside `preprocess`. The EXIF orientation is applied
    as transformers' and diffusers' `load_image` do; the mode is kept (`to_uint8_image` converts it). A file of more
    than one picture (an animation, or colour under transparency that convert("RGB") would show) is refused: only the
    server, given the file itself (`encoded`), checks all it holds."""
    return _opened(path, os.fspath(path))


def decode_image(data: bytes, name: str) -> Image.Image:
    """`load_image` for the bytes of a file already read (`name` goes into the error message)."""
    return _opened(io.BytesIO(data), name)


def _opened(source, name: str) -> Image.Image:
    try:
        image = open_image(source, max_aspect_ratio=MAX_ASPECT_RATIO, one_picture=True)
    except ImageError as error:
        raise ImageError(f"cannot read image file {name!r}: {error}") from error
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        if not np.array_equal(resize_and_crop(image), resize_and_crop(image.convert("RGB"))):
            raise ImageError(f"{name!r} hides colour under transparency: {_WHOLE_FILE}")
    return image


_WHOLE_FILE = "the pixel path checks one picture; send the file itself (--encoded) to have the server check all of it"


def open_image(
    file: str | os.PathLike | IO[bytes],
    max_pixels: int | None = None,
    formats: Sequence[str] | None = None,
    max_aspect_ratio: float | None = None,
    one_picture: bool = False,
) -> Image.Image:
    """The first frame of an image file (GIF, WebP, APNG: as Pillow opens it), upright, with limits.

    Refused from the header, before any pixel is decoded: width x height over `max_pixels` (a decompression bomb costs
    nothing), a longer side over `max_aspect_ratio` times the shorter (it would grow huge resized to a 224 shortest
    side), more than one frame when `one_picture`. `formats` are the Pillow format names tried (None: every format
    Pillow reads). Any failure raises ImageError."""
    try:
        with Image.open(file, formats=formats) as image:
            width, height, frames = image.width, image.height, getattr(image, "n_frames", 1)
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    f"{width}x{height} is {width * height} pixels, more than the "
                    f"limit of {max_pixels} (checked from the {image.format} header, nothing was decoded)"
                )
            if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * max(1, min(width, height)):
                raise ImageError(f"{width}x{height} is more than {max_aspect_ratio:g} times as long as it is wide")
            if one_picture and frames > 1:
                raise ImageError(f"an animation of {frames} frames: {_WHOLE_FILE}")
            image.load()
            return ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"decompression bomb refused from its header: {error}") from error
    except UnidentifiedImageError as error:
        known = f" ({', '.join(formats)})" if formats else ""
        raise ImageError(f"not an image file in a format the checker reads{known}") from error
    except Exception as error:  # Pillow raises many types for corrupt files: OSError, SyntaxError, struct.error, ...
        raise ImageError(f"corrupt or truncated image file{': ' if str(error) else ''}{error}") from error


def to_uint8_image(image: ImageLike, value_range: tuple[float, float] = ZERO_ONE) -> Image.Image:
    """Convert one image to the 8-bit RGB PIL image that CLIPImageProcessor resizes.

    Accepts a PIL image of any mode, or an array of shape (H, W), (H, W, C) or (C, H, W) with C in 1 (gray), 3 (RGB), 4
    (RGBA); channels-last wins when both ends could be channels. uint8 arrays are taken as they are. float16/32/64
    arrays hold values in `value_range`, (0, 1) as diffusers' output_type="np" gives or (-1, 1) as the VAE decodes, and
    become uint8 as diffusers' postprocess does it: x / 2 + 0.5 for (-1, 1) in the input's dtype, clamp to [0, 1], cast
    to float32, round(x * 255). Floats more than RANGE_TOLERANCE outside the range raise ImageError, since clamping them
    would hide that the caller passed the wrong range."""
    value_range = _checked_value_range(value_range)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_uint8_array(image, value_range))
    elif not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image is empty ({image.width}x{image.height})")
    return _convert_rgb(image)


def preprocess(images: Sequence[ImageLike] | np.ndarray, value_range: tuple[float, float] = ZERO_ONE) -> np.ndarray:
    """Make the checker's `pixel_values`: float32 [N, 3, 224, 224], C-contiguous.

    `images` is a sequence of images as `to_uint8_image` accepts them, or one 4-D array holding a batch, (N, H, W, C) or
    (N, C, H, W). The result equals CLIPImageProcessor's (PIL path) `pixel_values` for the same uint8 images."""
    return normalize(preprocess_uint8(images, value_range))


def preprocess_uint8(
    images: Sequence[ImageLike] | np.ndarray, value_range: tuple[float, float] = ZERO_ONE
) -> np.ndarray:
    """Resize and crop only: uint8 RGB [N, 224, 224, 3], what the uint8 ensemble takes; `normalize` of this is exactly
    `preprocess`, so the server can do the last step and the wire carries a quarter of the bytes."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ImageError(
            f"a batch array must be 4-D (N, H, W, C) or (N, C, H, W), got shape {images.shape}; "
            "pass a single image as a list of one"
        )
    if isinstance(images, Image.Image) or len(images) == 0:
        raise ImageError("expected a non-empty sequence of images")
    cropped = []
    for index, image in enumerate(images):
        try:
            cropped.append(resize_and_crop(image, value_range))
        except ImageError as error:
            raise ImageError(f"image {index}: {error}") from error
    return np.ascontiguousarray(np.stack(cropped))


def resize_and_crop(image: ImageLike, value_range: tuple[float, float] = ZERO_ONE) -> np.ndarray:
    """One image as `preprocess_uint8` makes it: uint8 RGB [224, 224, 3]; ImageError says why not."""
    return _resized_and_cropped(to_uint8_image(image, value_range))


def normalization_table() -> np.ndarray:
    """float32 [256, 3]: every uint8 level normalised, per channel. Each value is normalised alone, so this table is the
    whole step: the served normaliser is a lookup in it, bit-identical to CLIPImageProcessor by construction."""
    levels = np.arange(256, dtype=np.uint8)
    scaled = (levels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    return (scaled[:, None] - IMAGE_MEAN) / IMAGE_STD


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 224, 224, 3] -> float32 pixel_values [N, 3, 224, 224]: rescale, normalise, channels first."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ImageError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    pixels = normalization_table()[images, np.arange(3)]
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def _checked_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    value_range = tuple(value_range)
    if value_range not in (ZERO_ONE, MINUS_ONE_ONE):
        raise ValueError(f"value_range must be {ZERO_ONE} or {MINUS_ONE_ONE}, got {value_range}")
    return value_range


def _uint8_array(array: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Validate an image array and return it as uint8 (H, W) or (H, W, 3|4)."""
    if array.ndim == 3:
        if array.shape[0] in _CHANNEL_COUNTS and array.shape[-1] not in _CHANNEL_COUNTS:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] not in _CHANNEL_COUNTS:
            raise ImageError(f"image array of shape {array.shape} has no channel axis of size 1, 3 or 4 first or last")
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ImageError(f"image array must be 2-D (H, W) or 3-D (H, W, C) / (C, H, W), got shape {array.shape}")
    if array.size == 0:
        raise ImageError(f"image array is empty (shape {array.shape})")

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype not in _FLOAT_DTYPES:
        raise ImageError(f"image array dtype must be uint8, float16, float32 or float64, got {array.dtype}")
    if not np.isfinite(array).all():
        raise ImageError(f"image array holds {np.count_nonzero(~np.isfinite(array))} NaN or Inf values")
    low, high = value_range
    found_low, found_high = float(array.min()), float(array.max())
    if found_low < low - RANGE_TOLERANCE or found_high > high + RANGE_TOLERANCE:
        raise ImageError(
            f"float image values span [{found_low:.4g}, {found_high:.4g}], outside the stated "
            f"value_range {value_range}; pass the range the image is really in"
        )
    if value_range == MINUS_ONE_ONE:
        array = array / 2 + 0.5  # diffusers' denormalize, in the input's dtype
    array = np.clip(array, 0, 1).astype(np.float32)  # pt_to_numpy's .float()
    return np.ascontiguousarray((array * 255).round().astype(np.uint8))  # numpy_to_pil


def _convert_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _resized_and_cropped(image: Image.Image) -> np.ndarray:
    """Resize and centre-crop one RGB image; returns uint8 (224, 224, 3)."""
    # transformers' get_resize_output_image_size(default_to_square=False): the short side becomes SHORTEST_EDGE, the
    # long side int(SHORTEST_EDGE * long / short), truncated; even when the short side is that already, or smaller.
    width, height = image.size
    if width <= height:
        size = (SHORTEST_EDGE, int(SHORTEST_EDGE * height / width))
    else:
        size = (int(SHORTEST_EDGE * width / height), SHORTEST_EDGE)
    pixels = np.asarray(image.resize(size, resample=RESAMPLE))
    # transformers' center_crop; both sides are >= CROP_SIZE now, so its zero-padding branch never runs here.
    top, left = (pixels.shape[0] - CROP_SIZE) // 2, (pixels.shape[1] - CROP_SIZE) // 2
    return pixels[top : top + CROP_SIZE, left : left + CROP_SIZE]
