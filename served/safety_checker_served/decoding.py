"""Encoded image files -> the checker's uint8 images, with the client's own preprocessing.

Each batch element is one image file: its raw bytes, or the base64 text of
them (what a JSON request carries). They are told apart by content: a file of
a supported format starts with that format's signature (PNG, JPEG, GIF,
RIFF/WEBP, BM, II*/MM*), bytes no base64 text starts with; any other element
that is ASCII text is read as base64. Then the file is opened with the
client's `open_image` and resized and cropped with its `resize_and_crop`,
so the pixels equal, bit for bit, what the client computes from the same
file; the ensemble's normaliser then applies the client's own rescaling.

Every element is checked against the limits before its pixels are decoded:
its size (raw, or what its base64 text decodes to), its width x height from
the image header (a decompression bomb is refused without decoding it), the
format. The first element that fails refuses the whole request
(`ImageRefused`), naming its index and the reason.

Importable without Triton: the benchmark times `decode` in-process.
"""

import base64
import binascii
import io
from typing import NamedTuple, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from safety_checker_client.preprocess import ImageError, open_image, resize_and_crop

# The signature each supported format's files start with (Pillow's format names).
SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "WEBP": (b"RIFF",),  # and "WEBP" at offset 8
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
# Failures open_image already names (not an image of these formats, a bomb); any other one means a broken file.
_NAMED_FAILURES = (UnidentifiedImageError, Image.DecompressionBombError)
_TEXT = frozenset(range(0x20, 0x7F)) | frozenset(b"\t\n\r\x0b\x0c")


class Limits(NamedTuple):
    max_encoded_bytes: int
    max_pixels: int
    formats: Tuple[str, ...]


class ImageRefused(ValueError):
    """One element of the request cannot be checked: the request is refused as a whole."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index
        self.reason = reason


def limits_from(parameters: dict) -> Limits:
    """The limits from the model config's `parameters` (string values, as Triton passes them)."""
    formats = tuple(f.strip().upper() for f in parameters["formats"].split(",") if f.strip())
    unknown = [f for f in formats if f not in SIGNATURES]
    if unknown:
        raise ValueError(
            f"config parameter formats: {', '.join(unknown)} not supported (any of {', '.join(SIGNATURES)})"
        )
    limits = Limits(int(parameters["max_encoded_bytes"]), int(parameters["max_pixels"]), formats)
    if limits.max_encoded_bytes < 1 or limits.max_pixels < 1 or not formats:
        raise ValueError(f"config parameters max_encoded_bytes, max_pixels and formats must be positive: {limits}")
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


def decode_uint8(element: bytes, limits: Limits) -> np.ndarray:
    """One element -> the resized and cropped uint8 RGB image [224, 224, 3], as the client makes it."""
    try:
        image = open_image(
            io.BytesIO(file_bytes(element, limits)), max_pixels=limits.max_pixels, formats=limits.formats
        )
        return resize_and_crop(image)
    except ImageError as error:
        reason = str(error)
        if isinstance(error.__cause__, Exception) and not isinstance(error.__cause__, _NAMED_FAILURES):
            reason = f"corrupt or truncated image file: {reason}"
        raise ValueError(reason) from None


def decode(elements: Sequence[bytes], limits: Limits) -> np.ndarray:
    """A request's elements -> uint8 images [N, 224, 224, 3]; raises ImageRefused at the first bad one."""
    crops = []
    for index, element in enumerate(elements):
        try:
            crops.append(decode_uint8(bytes(element), limits))
        except ValueError as error:
            raise ImageRefused(index, str(error)) from None
    return np.stack(crops)


def set_pillow_limit(limits: Limits) -> None:
    """Pillow's own bomb check follows the configured limit (it raises above twice its threshold, which it
    checks in Image.open as decode() does); its warning is left out, since decode() refuses those at once."""
    import warnings

    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
