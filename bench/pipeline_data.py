"""The pipeline rows' input data: committed 512 px image files, and perf_analyzer's `--input-data` made from them.

    python -m bench.pipeline_data      # (re)writes the committed files in bench/pipeline_files

The files are scikit-image's bundled photographs (`skimage.data`: astronaut,
coffee, rocket; public domain or CC0 as scikit-image's data/README lists them),
centre-cropped to a square and resized to 512x512, Stable Diffusion's output
size, each as PNG and as JPEG. Every pipeline row is fed the same photographs:
the pixel rows their preprocessing (the client's own, float or uint8), the
image-file row the files themselves.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from bench.perf_data import encode
from safety_checker_client import spec
from safety_checker_client.preprocess import preprocess, preprocess_uint8

FOLDER = Path(__file__).resolve().parent / "pipeline_files"
PHOTOS = ("astronaut", "coffee", "rocket")
FORMATS = {"png": "PNG", "jpeg": "JPEG"}
SIDE = 512
JPEG_QUALITY = 90


def square(image: np.ndarray, side: int = SIDE) -> np.ndarray:
    """The centre square of an RGB image, resized to side x side (Lanczos)."""
    from PIL import Image

    height, width = image.shape[:2]
    edge = min(height, width)
    top, left = (height - edge) // 2, (width - edge) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top : top + edge, left : left + edge]))
    return np.asarray(crop.resize((side, side), Image.LANCZOS))


def write_files(folder: Path = FOLDER) -> List[Path]:
    """The committed files, from scikit-image's photographs (deterministic: same bytes on every run)."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        image = Image.fromarray(square(getattr(data, name)()))
        for extension, pillow_format in FORMATS.items():
            buffer = io.BytesIO()
            options = {"quality": JPEG_QUALITY} if extension == "jpeg" else {"optimize": False}
            image.save(buffer, pillow_format, **options)
            path = folder / f"{name}.{extension}"
            path.write_bytes(buffer.getvalue())
            written.append(path)
    return written


def files(folder: Path = FOLDER) -> List[bytes]:
    """The committed files' bytes, in PHOTOS order, PNG then JPEG of each."""
    return [(folder / f"{name}.{extension}").read_bytes() for name in PHOTOS for extension in FORMATS]


def decoded(folder: Path = FOLDER) -> List[np.ndarray]:
    """The committed PNG files' pixels (the JPEG files hold nearly the same), uint8 RGB [512, 512, 3]."""
    from PIL import Image

    return [np.asarray(Image.open(folder / f"{name}.png").convert("RGB")) for name in PHOTOS]


def serialized_bytes(element: bytes) -> Dict[str, str]:
    """One BYTES element as perf_analyzer reads `{"b64": ...}` for a BYTES input: Triton's serialisation, a
    little-endian uint32 length and then the bytes."""
    return {"b64": base64.b64encode(struct.pack("<I", len(element)) + element).decode("ascii")}


def documents(folder: Path = FOLDER) -> Dict[str, dict]:
    """perf_analyzer's input data for each model the pipeline rows measure, by model name."""
    images = decoded(folder)
    pixels = [{spec.PIXEL_VALUES.name: encode(p, "FP32")} for p in preprocess(images)]
    uint8 = [{spec.IMAGES.name: encode(p, "UINT8")} for p in preprocess_uint8(images)]
    encoded = [{spec.IMAGE.name: serialized_bytes(data)} for data in files(folder)]
    return {
        spec.EMBEDDER_MODEL: {"data": pixels},
        spec.ENSEMBLE_MODEL: {"data": pixels},
        spec.UINT8_ENSEMBLE_MODEL: {"data": uint8},
        spec.IMAGES_MODEL: {"data": encoded},
    }


def write_input_data(output: Path, folder: Path = FOLDER) -> Dict[str, Path]:
    """Each model's input data as a JSON file in `output`, by model name."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {}
    for model, document in documents(folder).items():
        paths[model] = output / f"{model}.json"
        paths[model].write_text(json.dumps(document), encoding="ascii")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    for path in write_files():
        print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
