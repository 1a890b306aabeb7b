"""Encoded image files -> the checker's uint8 images: every view of each file a person or a pipeline can see.

Each batch element is one image file: its raw bytes, or the base64 text of
them (what a JSON request carries). They are told apart by content: a file of
a supported format starts with that format's signature (PNG, JPEG, GIF,
RIFF/WEBP, BM, II*/MM*), bytes no base64 text starts with; any other element
that is ASCII text is read as base64.

A file has one view per frame (an animated GIF, WebP or PNG has several: the
APNG default image too, since a viewer without APNG shows it), and a frame
that is not opaque has two: composited onto white, as a viewer and the client
(CLIPImageProcessor) show it, and with its alpha dropped, as
`diffusers.utils.load_image` and any `.convert("RGB")` hand it to a
pipeline. Each view is made with the client's own EXIF handling and
`resize_and_crop`, so frame 0 composited equals, bit for bit, what the client
computes from the same file; the ensemble's normaliser then applies the
client's own rescaling, and its last step reports each file by its first
flagged view.

Every element is checked against the limits before its pixels are decoded:
its size (raw, or what its base64 text decodes to), the format, and from the
image header its width x height (a decompression bomb costs nothing) and its
aspect ratio (a thin, tall image would grow huge when resized to a 224
shortest side). An animation with more frames than `max_frames` is refused,
never cut short; a request whose files make more views than `max_views` (the
steps after the decoder take at most that many images) is refused as a whole
(`RequestRefused`): sent one file at a time, each fits. The first element
that fails refuses the request (`ImageRefused`), naming its index and the
reason; a file Pillow fails on in any way is refused so, never with a
traceback or an exception's type.

Importable without Triton: the benchmark times `decode` in-process.
"""

import base64
import binascii
import io
import itertools
from typing import List, NamedTuple, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from safety_checker_client.preprocess import ImageError, resize_and_crop

# The signature each supported format's files start with (Pillow's format names).
SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "WEBP": (b"RIFF",),  # and "WEBP" at offset 8
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
# Modes whose pixels carry alpha; any other mode is transparent only through a colour key ("transparency").
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_TEXT = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\r\x0b\x0c")


class Limits(NamedTuple):
    max_encoded_bytes: int
    max_pixels: int
    formats: Tuple[str, ...]
    max_aspect_ratio: float
    max_frames: int
    max_views: int


class View(NamedTuple):
    frame: int
    alpha_dropped: bool
    image: np.ndarray  # uint8 [224, 224, 3]


class ImageRefused(ValueError):
    """One element of the request cannot be checked: the request is refused as a whole."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index
        self.reason = reason


class RequestRefused(ValueError):
    """The request as a whole cannot be checked (its files make too many views); each file alone can be."""


def limits_from(parameters: dict) -> Limits:
    """The limits from the model config's `parameters` (string values, as Triton passes them)."""
    formats = tuple(f.strip().upper() for f in parameters["formats"].split(",") if f.strip())
    unknown = [f for f in formats if f not in SIGNATURES]
    if unknown:
        raise ValueError(
            f"config parameter formats: {', '.join(unknown)} not supported (any of {', '.join(SIGNATURES)})"
        )
    limits = Limits(
        int(parameters["max_encoded_bytes"]),
        int(parameters["max_pixels"]),
        formats,
        float(parameters["max_aspect_ratio"]),
        int(parameters["max_frames"]),
        int(parameters["max_views"]),
    )
    if min(limits.max_encoded_bytes, limits.max_pixels, limits.max_frames) < 1 or limits.max_aspect_ratio < 1:
        raise ValueError(f"config parameters of the decoder's limits must be positive: {limits}")
    if limits.max_views < 2 * limits.max_frames:
        raise ValueError(f"max_views must hold every view of one file (2 x max_frames): {limits}")
    return limits


def is_raw_file(data: bytes, formats: Sequence[str]) -> bool:
    """True when `data` starts with the signature of one of `formats`."""
    for name in formats:
        if any(data.startswith(signature) for signature in SIGNATURES[name]):
            return name != "WEBP" or data[8:12] == b"WEBP"
    return False


def file_bytes(element: bytes, limits: Limits) -> bytes:
    """The image file an element carries: the element itself, or what its base64 text decodes to.

    Raises ValueError with the reason when the element is empty, too large,
    or text that is not valid base64.
    """
    if len(element) == 0:
        raise ValueError("the element is empty")
    if is_raw_file(element, limits.formats) or not _TEXT.issuperset(element[:64]):
        data = element
    else:
        text = b"".join(element.split())  # line breaks, as base64 tools wrap at 76 columns
        if text[:1] == b"<":
            raise ValueError("an SVG, XML or HTML document: not a supported image format")
        if text[:5].lower() == b"data:":
            raise ValueError("a data: URL; send only the base64 text after its comma")
        if len(text) // 4 * 3 > limits.max_encoded_bytes + 2:
            raise ValueError(
                f"base64 text of about {len(text) // 4 * 3} bytes, more than the limit of "
                f"{limits.max_encoded_bytes} bytes (max_encoded_bytes)"
            )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(
                f"invalid base64 ({error}); a raw file must be one of {', '.join(limits.formats)}"
            ) from None
        if len(data) == 0:
            raise ValueError("the element is empty (empty base64 text)")
    if len(data) > limits.max_encoded_bytes:
        raise ValueError(
            f"the file is {len(data)} bytes, more than the limit of {limits.max_encoded_bytes} bytes "
            "(max_encoded_bytes)"
        )
    return data


def views(element: bytes, limits: Limits) -> List[View]:
    """Every view of one element, frame by frame; ValueError says why the element cannot be checked."""
    data = file_bytes(element, limits)
    try:
        with Image.open(io.BytesIO(data), formats=limits.formats) as image:
            _check_header(image, limits)
            return [view for frame in _frames(image, limits) for view in _frame_views(*frame)]
    except ImageError as error:  # the client's preprocessing refused the picture (an empty frame, ...)
        raise ValueError(str(error)) from None
    except ValueError:  # our own refusals (RecursionError and OverflowError are not ValueErrors)
        raise
    except Image.DecompressionBombError as error:
        raise ValueError(f"decompression bomb refused from its header: {error}") from None
    except UnidentifiedImageError:
        raise ValueError(f"not an image file in a format the checker reads ({', '.join(limits.formats)})") from None
    except Exception as error:  # Pillow raises many types for hostile files: none may fail other requests
        raise ValueError(f"corrupt or truncated image file, it cannot be decoded{_detail(error)}") from None


def _detail(error: Exception) -> str:
    """Pillow's own words about a broken file, when it has some that are short; never its type or a path."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f": {text}" if text and len(text) <= 120 and "/" not in text else ""


def _check_header(image: Image.Image, limits: Limits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"the image is empty ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ValueError(
            f"{width}x{height} is {width * height} pixels, more than the limit of {limits.max_pixels} "
            f"(max_pixels; checked from the {image.format} header, nothing was decoded)"
        )
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ValueError(
            f"{width}x{height} is more than {limits.max_aspect_ratio:g} times as long as it is wide "
            f"(max_aspect_ratio; checked from the {image.format} header, nothing was decoded)"
        )


def _frames(image: Image.Image, limits: Limits):
    """(index, frame) for every frame, upright as the EXIF tag says; refused past max_frames, never cut short."""
    for index in itertools.count():
        try:
            image.seek(index)
        except EOFError:
            return
        if index == limits.max_frames:
            raise ValueError(
                f"more than {limits.max_frames} frames (max_frames): an animation is checked frame by frame, "
                "never cut short"
            )
        yield index, ImageOps.exif_transpose(image)


def _frame_views(index: int, frame: Image.Image) -> List[View]:
    """The frame as a viewer composites it; and, when it is not opaque, as a pipeline's convert("RGB") has it."""
    composited = resize_and_crop(frame)
    if frame.mode not in _ALPHA_MODES and "transparency" not in frame.info:
        return [View(index, False, composited)]
    dropped = resize_and_crop(frame.convert("RGB"))
    if np.array_equal(dropped, composited):
        return [View(index, False, composited)]
    return [View(index, False, composited), View(index, True, dropped)]


def decode(elements: Sequence[bytes], limits: Limits) -> Tuple[np.ndarray, np.ndarray]:
    """A request's elements -> (uint8 images [M, 224, 224, 3], int32 views [M, 3]: the element's index, the frame,
    1 where alpha was dropped). Raises ImageRefused at the first bad element, RequestRefused for too many views."""
    found: List[Tuple[int, View]] = []
    for index, element in enumerate(elements):
        try:
            found += [(index, view) for view in views(bytes(element), limits)]
        except ValueError as error:
            raise ImageRefused(index, str(error)) from None
        if len(found) > limits.max_views:
            raise RequestRefused(
                f"the files of this request make more than {limits.max_views} views to check (max_views: each "
                "frame, and each frame that is not opaque twice); send fewer files per request"
            )
    images = np.stack([view.image for _, view in found])
    rows = np.array([(index, view.frame, int(view.alpha_dropped)) for index, view in found], dtype=np.int32)
    return images, rows


def set_pillow_limit(limits: Limits) -> None:
    """Pillow's own bomb check follows the configured limit (it raises above twice its threshold, which it
    checks in Image.open as decode() does); its warning is left out, since decode() refuses those at once."""
    import warnings

    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
