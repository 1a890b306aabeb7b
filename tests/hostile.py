"""Hostile inputs for tests/test_adversarial.py: image files, base64 tricks, concept files, and what an answer must be.

Image cases are built from two pictures the tiny checker answers differently:
`flagged` (F) and `passed` (P), the same size. A case hides F where a
first-frame or composited-only checker would not look (a later frame, an
APNG's animation behind a passing default image, pixels under alpha 0), or
breaks the file in a way that must be refused. Each case says what the
server may answer: REFUSED (an error naming the image), ANSWERED (exactly
the decision of the content checked properly: every frame Pillow decodes,
each composited onto white and, when not opaque, with its alpha dropped), or
EITHER (a refusal, or that decision).
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np
from PIL import Image, ImageOps, ImageSequence

REFUSED, ANSWERED, EITHER = "refused", "answered", "either"
# What no error message may hold: a traceback, a server path, a Python file or exception type.
_LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|(^|[\s'\"(=])/(tmp|work|opt|usr|home|root|var|proc)/"
    r"|\b[A-Z][A-Za-z]*(Error|Exception)\b"
)


def leaks(message: str) -> List[str]:
    """What in an error message tells an attacker about the server's code or files."""
    return [m.group(0) for m in _LEAKS.finditer(message)]


@dataclass(frozen=True)
class Pictures:
    flagged: Image.Image  # RGB, flagged by the tiny checker on the pixel path
    passed: Image.Image  # RGB, the same size, not flagged


@dataclass(frozen=True)
class Case:
    make: Callable[[Pictures], bytes]  # the element as sent raw (gRPC, HTTP binary)
    expect: str  # REFUSED, ANSWERED or EITHER
    hides_flagged: bool = False  # F is where a first-frame, composited-only check would not see it
    text: bool = False  # the element is text: a JSON request carries it as it is, not as its base64


def encode(image: Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def proper_views(data: bytes) -> List[Image.Image]:
    """The content checked properly, decoded with Pillow alone: every frame upright, composited onto white
    (the client's pixel path does that) and, when it holds transparency, with its alpha dropped."""
    found = []
    with Image.open(io.BytesIO(data)) as image:
        for frame in ImageSequence.Iterator(image):
            upright = ImageOps.exif_transpose(frame)
            found.append(upright.copy())
            if "A" in upright.getbands() or "transparency" in upright.info:
                found.append(upright.convert("RGB"))
    return found


# -- files made of the two pictures ----------------------------------------------------------------------


def hidden_alpha(picture: Image.Image, alpha: int = 0) -> Image.Image:
    rgba = picture.convert("RGBA")
    rgba.putalpha(alpha)
    return rgba


def _apng(frames: List[Image.Image], **options) -> bytes:
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], **options)


def _gif(frames: List[Image.Image]) -> bytes:
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _webp(frames: List[Image.Image]) -> bytes:
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


def _exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def _all_transparent_palette(p: Pictures) -> bytes:
    palette = p.flagged.quantize(256)
    return encode(palette, "PNG", transparency=bytes(256))


def _tall(p: Pictures, ratio: int) -> bytes:
    width = 20
    return encode(p.flagged.resize((width, width * ratio)), "PNG")


# -- bad files ---------------------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming width x height grey pixels, with one tiny row of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + _chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims width x height, holding one 1x1 frame."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\0" * 16


def jpeg_claiming(width: int, height: int) -> bytes:
    """A baseline JPEG's start of frame claiming width x height, then nothing decodable."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0" + sof + b"\xff\xd9"


def webp_claiming(width: int, height: int) -> bytes:
    """An extended WebP (VP8X) whose canvas claims width x height."""
    vp8x = struct.pack("<I", 0) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff_claiming(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    entries += [(273, 4, 1, 8 + 2 + 12 * 7 + 4), (277, 3, 1, 1), (279, 4, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0"


def _gif_frames(count: int, size: int = 8) -> bytes:
    frames = [Image.new("L", (size, size), (37 * i) % 256) for i in range(count)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)


def _corrupt_idat(p: Pictures) -> bytes:
    good = encode(p.passed, "PNG")
    start = good.index(b"IDAT") + 4
    return good[: start + 2] + bytes(range(64)) + good[start + 66 :]


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _ztxt_bomb(p: Pictures) -> bytes:
    good = encode(p.flagged, "PNG")
    text = _chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 200_000_000, 9))
    return good[:33] + text + good[33:]


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def image_cases() -> Dict[str, Case]:
    """Every hostile image element by name."""
    F = lambda p: encode(p.flagged, "PNG")
    cases = {
        # Hidden frames (finding 1 and beyond): F where a first-frame checker never looks.
        "apng-default-image-passes-animation-flagged": Case(
            lambda p: _apng([p.passed, p.flagged], default_image=True), ANSWERED, True
        ),
        "apng-default-image-flagged-animation-passes": Case(
            lambda p: _apng([p.flagged, p.passed], default_image=True), ANSWERED
        ),
        "apng-second-frame-flagged": Case(lambda p: _apng([p.passed, p.flagged]), ANSWERED, True),
        "apng-sixteenth-frame-flagged": Case(lambda p: _apng([p.passed] * 15 + [p.flagged]), ANSWERED, True),
        "apng-zero-duration-flagged-frame": Case(
            lambda p: _apng([p.passed, p.flagged], duration=[1000, 0]), ANSWERED, True
        ),
        "gif-second-frame-flagged": Case(lambda p: _gif([p.passed, p.flagged]), ANSWERED),
        "gif-sixteenth-frame-flagged": Case(lambda p: _gif([p.passed] * 15 + [p.flagged]), ANSWERED),
        "webp-second-frame-flagged": Case(lambda p: _webp([p.passed, p.flagged]), ANSWERED, True),
        "webp-alpha-hidden-second-frame": Case(
            lambda p: _webp([p.passed.convert("RGBA"), hidden_alpha(p.flagged)]), ANSWERED, True
        ),
        "apng-alpha-hidden-second-frame": Case(
            lambda p: _apng([p.passed.convert("RGBA"), hidden_alpha(p.flagged)]), ANSWERED, True
        ),
        # Transparency (finding 2 and beyond).
        "png-rgba-alpha-0": Case(lambda p: encode(hidden_alpha(p.flagged), "PNG"), ANSWERED, True),
        "png-rgba-alpha-1": Case(lambda p: encode(hidden_alpha(p.flagged, 1), "PNG"), ANSWERED, True),
        "webp-rgba-alpha-0": Case(lambda p: encode(hidden_alpha(p.flagged), "WEBP", lossless=True), ANSWERED, True),
        "tiff-rgba-alpha-0": Case(lambda p: encode(hidden_alpha(p.flagged), "TIFF"), ANSWERED, True),
        "png-la-alpha-0": Case(lambda p: encode(hidden_alpha(p.flagged).convert("LA"), "PNG"), ANSWERED),
        "png-palette-every-entry-transparent": Case(_all_transparent_palette, ANSWERED),
        "gif-palette-transparent": Case(lambda p: encode(p.flagged.quantize(255), "GIF", transparency=0), ANSWERED),
        # Orientation, modes, polyglots, shapes: answered as the content is.
        "jpeg-exif-rotated": Case(lambda p: encode(p.flagged, "JPEG", quality=95, exif=_exif(6)), ANSWERED),
        "jpeg-exif-orientation-out-of-range": Case(
            lambda p: encode(p.flagged, "JPEG", quality=95, exif=_exif(65535)), ANSWERED
        ),
        "png-1-bit": Case(lambda p: encode(p.flagged.convert("1"), "PNG"), ANSWERED),
        "jpeg-cmyk": Case(lambda p: encode(p.flagged.convert("CMYK"), "JPEG", quality=95), ANSWERED),
        "tiff-32-bit-integer": Case(lambda p: encode(p.flagged.convert("I"), "TIFF"), EITHER),
        "polyglot-png-then-html": Case(lambda p: F(p) + b"<html><script>alert(1)</script></html>", ANSWERED),
        "polyglot-png-then-zip": Case(lambda p: F(p) + b"PK\x03\x04" + bytes(26) + b"x.txt" + b"hello", ANSWERED),
        "polyglot-jpeg-then-second-jpeg": Case(
            lambda p: encode(p.flagged, "JPEG", quality=95) + encode(p.passed, "JPEG", quality=95), ANSWERED
        ),
        "polyglot-gif-javascript": Case(lambda p: b"GIF89a/*\x00\x00*/=alert(1);//" + bytes(40), REFUSED),
        "png-trailing-garbage": Case(lambda p: F(p) + bytes(range(256)) * 16, ANSWERED),
        "png-without-iend": Case(lambda p: F(p)[:-12], EITHER),
        "png-ztxt-bomb": Case(_ztxt_bomb, EITHER),
        "tall-exactly-max-aspect-ratio": Case(lambda p: _tall(p, 16), ANSWERED),
        # Broken files of every format.
        "empty": Case(lambda p: b"", REFUSED),
        "whitespace": Case(lambda p: b" \n\t ", REFUSED, text=True),
        "one-zero-byte": Case(lambda p: b"\0", REFUSED),
        "png-signature-only": Case(lambda p: b"\x89PNG\r\n\x1a\n", REFUSED),
        "png-header-without-data": Case(lambda p: F(p)[:33] + _chunk(b"IEND", b""), REFUSED),
        "png-truncated": Case(lambda p: _half(F(p)), REFUSED),
        "png-corrupt-pixel-data": Case(_corrupt_idat, REFUSED),
        "jpeg-truncated": Case(lambda p: _half(encode(p.flagged, "JPEG")), EITHER),
        "jpeg-soi-then-garbage": Case(lambda p: b"\xff\xd8\xff" + bytes(range(256)) * 8, REFUSED),
        "gif-truncated": Case(lambda p: _half(_gif([p.passed, p.flagged])), EITHER),
        "webp-truncated": Case(lambda p: _half(encode(p.flagged, "WEBP")), REFUSED),
        "bmp-truncated": Case(lambda p: _half(encode(p.flagged, "BMP")), REFUSED),
        "tiff-truncated": Case(lambda p: _half(encode(p.flagged, "TIFF")), REFUSED),
        "apng-truncated-in-hidden-frame": Case(lambda p: _apng([p.passed, p.flagged])[:-200], EITHER),
        "riff-wave-not-webp": Case(lambda p: b"RIFF\x24\0\0\0WAVEfmt " + bytes(40), REFUSED),
        "svg": Case(lambda p: b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="9" height="9"/></svg>', REFUSED),
        "pdf": Case(lambda p: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", REFUSED),
        "psd": Case(lambda p: b"8BPS\0\x01" + bytes(6) + b"\0\x03" + struct.pack(">II", 4, 4) + bytes(40), REFUSED),
        "ico": Case(lambda p: encode(p.flagged.resize((32, 32)), "ICO"), REFUSED),
        "ppm": Case(lambda p: encode(p.flagged, "PPM"), REFUSED),
        # Sizes declared in headers (findings 5 and 6, and every format's header).
        "png-claims-100000x100000": Case(lambda p: png_claiming(100_000, 100_000), REFUSED),
        "png-claims-1x50000000": Case(lambda p: png_claiming(1, 50_000_000), REFUSED),
        "png-claims-100x500000": Case(lambda p: png_claiming(100, 500_000), REFUSED),
        "png-claims-0x0": Case(lambda p: png_claiming(0, 0), REFUSED),
        "png-claims-2147483647-wide": Case(lambda p: png_claiming(2**31 - 1, 1), REFUSED),
        "gif-claims-65535x65535": Case(lambda p: gif_claiming(65535, 65535), REFUSED),
        "bmp-claims-100000x100000": Case(lambda p: bmp_claiming(100_000, 100_000), REFUSED),
        "bmp-claims-negative-height": Case(lambda p: bmp_claiming(100_000, -100_000), REFUSED),
        "jpeg-claims-65500x65500": Case(lambda p: jpeg_claiming(65500, 65500), REFUSED),
        "webp-claims-16777216x16777216": Case(lambda p: webp_claiming(2**24, 2**24), REFUSED),
        "tiff-claims-100000x100000": Case(lambda p: tiff_claiming(100_000, 100_000), REFUSED),
        "thin-real-png-1x400": Case(lambda p: encode(Image.new("RGB", (1, 400), "white"), "PNG"), REFUSED),
        "thin-real-png-17-to-1": Case(lambda p: _tall(p, 17), REFUSED),
        "gif-17-frames": Case(lambda p: _gif_frames(17), REFUSED),
        "gif-1000-tiny-frames": Case(lambda p: _gif_frames(1000, 2), REFUSED),
        # base64 tricks (the element is text: a JSON request carries it as it is).
        "base64-wrapped-at-76": Case(lambda p: base64.encodebytes(F(p)), ANSWERED, text=True),
        "base64-leading-and-trailing-whitespace": Case(lambda p: b"\n  " + _b64(F(p)) + b"  \n", ANSWERED, text=True),
        "base64-url-safe-alphabet": Case(lambda p: base64.urlsafe_b64encode(F(p)), EITHER, text=True),
        "base64-missing-padding": Case(lambda p: _b64(F(p)[:-1]).rstrip(b"="), REFUSED, text=True),
        "base64-extra-padding": Case(lambda p: _b64(F(p)) + b"====", REFUSED, text=True),
        "base64-garbage-after": Case(lambda p: _b64(F(p)) + b"!!", REFUSED, text=True),
        "base64-of-base64": Case(lambda p: _b64(_b64(F(p))), REFUSED, text=True),
        "base64-of-a-bomb": Case(lambda p: _b64(png_claiming(100_000, 100_000)), REFUSED, text=True),
        "base64-of-a-thin-image": Case(lambda p: _b64(png_claiming(100, 500_000)), REFUSED, text=True),
        "base64-of-truncated": Case(lambda p: _b64(_half(F(p))), REFUSED, text=True),
        "base64-of-nothing": Case(lambda p: b"====", REFUSED, text=True),
        "data-url": Case(lambda p: b"data:image/png;base64," + _b64(F(p)), REFUSED, text=True),
        "data-url-upper-case": Case(lambda p: b"DATA:image/png;base64," + _b64(F(p)), REFUSED, text=True),
        "base64-with-nul-inside": Case(lambda p: _b64(F(p))[:40] + b"\0" + _b64(F(p))[40:], REFUSED),
        "base64-with-utf8-bom": Case(lambda p: b"\xef\xbb\xbf" + _b64(F(p)), REFUSED),
        "base64-over-20-mib": Case(lambda p: _b64(b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)), REFUSED, text=True),
    }
    return cases


# -- custom concept files -----------------------------------------------------------------------------------


def concept_file(version: int = 1, dim: int = 16, count: int = 1, **top) -> Dict[str, object]:
    """A valid custom concept set as its JSON object (the tiny checker's embeddings are 16 wide)."""
    rng = np.random.default_rng(count + version)
    concepts = []
    for i in range(count):
        vector = rng.standard_normal(dim)
        concepts.append(
            {
                "name": f"c{i:04d}",
                "category": "custom",
                "source": {"kind": "text", "text": f"thing {i}"},
                "embedding": [float(v) for v in vector / np.linalg.norm(vector)],
                "threshold": 0.5,
                "created": "2026-11-30",
            }
        )
    data = {"format_version": 1, "version": version, "embedding_dim": dim, "updated": "2026-11-30T12:00:00+00:00"}
    return {**data, "concepts": concepts, **top}


def _dumped(**changes) -> bytes:
    return json.dumps(concept_file(version=7, **changes)).encode()


def _edited(edit: Callable[[dict], None]) -> bytes:
    data = concept_file(version=7)
    edit(data)
    return json.dumps(data).encode()


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda data: data.__setitem__(key, value)


def _set_concept(key: str, value) -> Callable[[dict], None]:
    return lambda data: data["concepts"][0].__setitem__(key, value)


def _raw_version(text: str) -> bytes:
    return json.dumps(concept_file(version=7)).replace('"version": 7', f'"version": {text}').encode()


# name -> the bytes of a custom_concepts.json that must never be served (the last good set stays).
CONCEPT_FILES: Dict[str, Callable[[], bytes]] = {
    "nested-arrays-100000-deep": lambda: b"[" * 100_000 + b"]" * 100_000,
    "nested-objects-100000-deep": lambda: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep-inside-a-concept": lambda: _dumped().replace(
        b'"created"', b'"deep": ' + b"[" * 50_000 + b"]" * 50_000 + b', "created"'
    ),
    "version-2-to-the-63": lambda: _raw_version(str(2**63)),
    "version-2-to-the-53": lambda: _raw_version(str(2**53)),
    "version-negative": lambda: _raw_version("-1"),
    "version-1e400": lambda: _raw_version("1e400"),
    "version-float": lambda: _raw_version("8.0"),
    "version-string": lambda: _raw_version('"8"'),
    "version-bool": lambda: _raw_version("true"),
    "version-nan": lambda: _raw_version("NaN"),
    "version-a-million-digits": lambda: _raw_version("9" * 1_000_000),
    "embedding-dim-claims-32": lambda: _dumped(dim=32),
    "embedding-dim-claims-a-googol": lambda: _edited(_set("embedding_dim", 10**100)),
    "embedding-shorter-than-dim": lambda: _edited(lambda d: d["concepts"][0]["embedding"].pop()),
    "embedding-not-normalised": lambda: _edited(_set_concept("embedding", [1.0] * 16)),
    "embedding-holds-nan": lambda: _edited(_set_concept("embedding", [float("nan")] + [0.0] * 15)),
    "threshold-infinite": lambda: _dumped().replace(b'"threshold": 0.5', b'"threshold": 1e999'),
    "threshold-a-string": lambda: _edited(_set_concept("threshold", "0.5")),
    "over-1000-concepts": lambda: json.dumps(concept_file(version=7, count=1001)).encode(),
    "name-a-million-characters": lambda: _edited(_set_concept("name", "n" * 1_000_000)),
    "top-level-a-list": lambda: b"[]",
    "top-level-null": lambda: b"null",
    "empty-file": lambda: b"",
    "truncated": lambda: _half(_dumped()),
    "not-utf-8": lambda: b"\xff\xfe" + _dumped().decode().encode("utf-16-le"),
    "format-version-2": lambda: _edited(_set("format_version", 2)),
    "reserved-concept-name": lambda: _edited(_set_concept("name", "concept_3")),
}
