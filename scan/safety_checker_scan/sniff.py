"""Whether a file may be an image, by its content and by its name: only a file that neither calls one is not.

A scan skips a file that is not an image (a stray README.txt) instead of
counting it as an error. That must never let an image through unchecked, so
both have to agree: its first bytes are no image format's signature (those
the server decodes, any format Pillow identifies, and image formats the
checker cannot read: SVG, HEIF/AVIF, JPEG XL, JPEG 2000), and its extension
is no image format's. A text file named photo.png, or an SVG named notes.txt,
is an image that cannot be read: an error line, as before.
"""

from __future__ import annotations

import io
import os
from typing import Optional

from PIL import Image, UnidentifiedImageError

# The signatures of the formats the server decodes (--encoded); WebP's RIFF also needs "WEBP" at offset 8.
SERVED_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# Image formats the checker does not read, which must still never pass for "not an image".
OTHER_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ")
# The brands of an ISO media file ("ftyp" at offset 4) that hold pictures: HEIF, HEIC, AVIF.
IMAGE_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")
SVG_WINDOW = 4096  # an SVG file names its <svg> element within this many bytes (after any XML prolog)
IMAGE_EXTENSIONS = frozenset(
    ".apng .arw .avif .bmp .cr2 .dib .dng .eps .gif .heic .heif .ico .j2k .jfif .jp2 .jpe .jpeg .jpg .jpx .jxl .nef "
    ".orf .pbm .pcx .pgm .png .pnm .ppm .psd .qoi .raw .rw2 .svg .svgz .tga .tif .tiff .webp .xbm .xpm".split()
)
NOT_AN_IMAGE = "not an image: neither its content nor its name is an image format's"


def content_is_image(data: bytes) -> bool:
    """Whether `data` starts as an image file does (a damaged one included: it fails to decode, an error)."""
    if data.startswith(SERVED_SIGNATURES + OTHER_SIGNATURES) or data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    if data[4:8] == b"ftyp" and data[8:12] in IMAGE_BRANDS or b"<svg" in data[:SVG_WINDOW].lower():
        return True
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except UnidentifiedImageError:
        return False
    except Exception:  # a format was recognised but its header is damaged: an image that cannot be read
        return True


def not_an_image(data: bytes, path: str) -> Optional[str]:
    """Why the file is not an image, or None when it may be one (and must be checked, or fail)."""
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS or content_is_image(data):
        return None
    return NOT_AN_IMAGE
