"""Image files for the encoded-input tests: the photos in three formats, every PIL mode, animations, bad files.

Each is made in memory (bytes); the tests write them where a path is needed.
Synthetic pictures are smooth gradients with noise at odd sizes, so that the
resize, the crop and every conversion change pixels.
"""

from __future__ import annotations

import base64
import functools
import io
import struct
import zlib
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from fixtures.photos import PHOTOS, photo_file

# EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise to be upright.
ROTATED = 6
MIRRORED = 2


def picture(seed: int, height: int = 301, width: int = 457, channels: int = 3) -> np.ndarray:
    """uint8 [H, W, C]: a gradient with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (3 + c) + y * (5 - c) + 40 * c) % 256 for c in range(channels)], axis=-1)
    noise = rng.integers(-40, 41, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(image: Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def photo_files() -> Dict[str, bytes]:
    """The scikit-image photos as PNG, JPEG and lossless WebP, one JPEG EXIF-rotated, one lossy WebP."""
    files = {}
    for name in PHOTOS:
        for extension in ("png", "jpeg", "webp"):
            files[f"{name}.{extension}"] = photo_file(name, extension)
    files["chelsea-exif-rotated.jpeg"] = photo_file("chelsea", "jpeg", exif=exif(ROTATED))
    files["coffee-exif-mirrored.png"] = photo_file("coffee", "png", exif=exif(MIRRORED))
    files["rocket-lossy.webp"] = photo_file("rocket", "webp", lossless=False, quality=80)
    return files


def _alpha(seed: int, colour: np.ndarray, hidden: bool) -> np.ndarray:
    """colour with an alpha channel; unless `hidden`, every pixel that is not opaque is white underneath,
    so that compositing onto white and dropping the alpha give the same picture."""
    rng = np.random.default_rng(seed)
    alpha = rng.integers(0, 256, size=colour.shape[:2], dtype=np.uint8)
    alpha[: colour.shape[0] // 3] = 255  # an opaque band, so the picture is not all white
    if not hidden:
        colour = np.where((alpha < 255)[..., None], 255, colour).astype(np.uint8)
    return np.concatenate([colour, alpha[..., None]], axis=-1)


def mode_files(hidden: bool = False) -> Dict[str, bytes]:
    """One file per PIL mode the client accepts: RGBA, LA, P (with transparency), L, I;16, CMYK; and RGB.

    With `hidden`, only the modes with transparency, holding colour under
    pixels that are not opaque (where diffusers' load_image, which drops the
    alpha, and CLIPImageProcessor, which composites onto white, disagree).
    """
    rgb = picture(1)
    files = {
        "rgba.png": encode(Image.fromarray(_alpha(2, rgb, hidden), "RGBA"), "PNG"),
        "la.png": encode(Image.fromarray(_alpha(3, picture(4, channels=1)[..., 0:1], hidden), "LA"), "PNG"),
    }
    palette = Image.fromarray(picture(5)).quantize(64)
    transparent = int(np.bincount(np.asarray(palette)[:, 120:340].ravel()).argmax())  # most used in the crop
    if not hidden:
        colours = palette.getpalette()
        colours[3 * transparent : 3 * transparent + 3] = [255, 255, 255]  # white under the transparency
        palette.putpalette(colours)
    files["p-transparent.png"] = encode(palette, "PNG", transparency=transparent)
    if hidden:
        return {f"hidden-{name}": data for name, data in files.items()}
    gray = Image.fromarray(picture(6, channels=1)[..., 0])
    deep = (picture(7, channels=1)[..., 0].astype(np.uint16) * 257 + np.arange(457, dtype=np.uint16)) % 65536
    files.update(
        {
            "p.png": encode(palette.convert("RGB").quantize(200), "PNG"),
            "l.png": encode(gray, "PNG"),
            "l.jpeg": encode(gray, "JPEG", quality=85),
            "i16.png": encode(Image.fromarray(deep.astype(np.uint16)), "PNG"),
            "i16.tiff": encode(Image.fromarray(deep.astype(np.uint16)), "TIFF"),
            "cmyk.jpeg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=90),
            "cmyk.tiff": encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"),
            "rgb.bmp": encode(Image.fromarray(picture(8)), "BMP"),
            "rgb-rotated.webp": encode(Image.fromarray(picture(9)), "WEBP", quality=85, exif=exif(ROTATED)),
        }
    )
    return files


def animation_frames():
    """Two frames that differ: only the first may be checked."""
    first = Image.fromarray(picture(10, 240, 320))
    return [first, Image.fromarray(picture(11, 240, 320)[::-1])]


def animated_files() -> Dict[str, bytes]:
    """The same two frames as an animated GIF, WebP and PNG (APNG)."""
    first, second = animation_frames()
    return {
        "animated.gif": encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0),
        "animated.webp": encode(first, "WEBP", save_all=True, append_images=[second], lossless=True),
        "animated.png": encode(first, "PNG", save_all=True, append_images=[second]),
    }


def parity_files() -> Dict[str, bytes]:
    """Everything the parity tests send, by file name."""
    return {**photo_files(), **mode_files(), **mode_files(hidden=True), **animated_files()}


def has_transparency(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return "A" in image.getbands() or image.info.get("transparency") is not None


# -- Bad files -----------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 8-bit grey pixels, then one tiny row: a decompression bomb
    as far as its header goes (decoding it would fail as truncated, so refusing it by size proves the size
    was refused first)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * 8)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


@functools.cache
def grey_png(width: int, height: int) -> bytes:
    """A whole, valid PNG of width x height black grey pixels: a few kilobytes however large, since zeros compress
    (findings 5 and 6: 100x500,000 is 49 KB, 1x50,000,000 is 97 KB)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte, then the row
    rows_per_piece = max(1, (1 << 20) // len(row))
    piece = row * rows_per_piece
    parts = [compressor.compress(piece) for _ in range(height // rows_per_piece)]
    parts += [compressor.compress(row * (height % rows_per_piece)), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    """A whole PNG whose compressed pixel data is garbage."""
    good = encode(Image.fromarray(picture(12, 64, 64)), "PNG")
    start = good.index(b"IDAT") + 4
    damaged = bytearray(good)
    damaged[start + 2 : start + 40] = bytes(range(38))
    return bytes(damaged)


def small_png(seed: int = 13) -> bytes:
    """A good 80x64 PNG."""
    return encode(Image.fromarray(picture(seed, 64, 80)), "PNG")


def bad_elements() -> Dict[str, Tuple[bytes, str]]:
    """case -> (an element the server must refuse, a fragment of the reason it gives), at the default limits."""
    png = small_png()
    return {
        "empty": (b"", "empty"),
        "empty base64": (b"  \n", "empty"),
        "not an image": (bytes(range(256)) * 4, "not an image file in a format the checker reads (PNG, JPEG"),
        "base64 of no image": (base64.b64encode(bytes(range(256))), "not an image file in a format"),
        "truncated": (png[: len(png) // 2], "corrupt or truncated image file"),
        "corrupt": (corrupt_png(), "corrupt or truncated image file"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        "ppm (a format Pillow reads, not served)": (b"P6\n2 2\n255\n" + bytes(range(12)), "not an image file"),
        "invalid base64": (b"iVBORw0KGgo!!!!", "invalid base64"),
        "bad base64 padding": (b"iVBORw0KGgoAAAANSUhEUg", "invalid base64"),
        "data url": (b"data:image/png;base64," + base64.b64encode(png), "data: URL"),
        "decompression bomb": (png_claiming(10_000, 10_000), "10000x10000 is 100000000 pixels, more than the limit"),
        "decompression bomb, as base64": (base64.b64encode(png_claiming(8_000, 8_000)), "more than the limit of"),
        "bomb past Pillow's own check": (png_claiming(20_000, 20_000), "decompression bomb"),
        "thin and tall, within max_pixels (finding 5)": (grey_png(100, 500_000), "times as long as it is wide"),
        "one pixel wide, within max_pixels (finding 6)": (grey_png(1, 50_000_000), "times as long as it is wide"),
    }
