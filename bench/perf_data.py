"""perf_analyzer `--input-data` files: real photographs as each ensemble receives them.

    python -m bench.perf_data [--output DIR]      # default: bench/perf_analyzer

writes one JSON file per served ensemble, named after it:

* `safety_checker.json`: `pixel_values`, FP32 [3, 224, 224], as `preprocess` makes it;
* `safety_checker_uint8.json`: `images`, UINT8 [224, 224, 3], as `preprocess_uint8` makes it.

Both hold the same scikit-image photographs (`PHOTOS`), in the same order, put
through the client's own preprocessing, so perf_analyzer measures the server on
the tensors a real client sends and both files make the server give the same
answers (tests/test_perf_data.py checks that against a running tritonserver).

Format (perf_analyzer's docs/input_data.md, "Real Input Data"): a top-level
object whose only member is `"data"`, a list with one object per batch-1
request; each object maps every model input to its tensor. Tensors are given as
`{"b64": "..."}`: the raw bytes of one batch-1 tensor, row-major, little-endian,
Base64-encoded (4/3 of the raw size, where a JSON list of floats would be
about 3x). No `"shape"`: the inputs have fixed dims, and perf_analyzer then
takes the shape from the model and checks the decoded byte size against it.
With `-b N` perf_analyzer fills each request with N consecutive entries,
wrapping around the list.

Every name, datatype and shape comes from `safety_checker_client.spec`.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fixtures.photos import photo
from safety_checker_client import spec
from safety_checker_client.preprocess import preprocess, preprocess_uint8

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "perf_analyzer"

# scikit-image's bundled photographs (no download): a portrait and a cat, square and
# landscape. Two keep the FP32 file at 1.6 MB; perf_analyzer cycles through them.
PHOTOS = ("astronaut", "chelsea")

# KServe v2 datatype -> explicitly little-endian numpy dtype, as perf_analyzer reads b64 content.
NUMPY_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}

# Ensemble name -> (its inputs, the client function that makes them from images).
ENSEMBLES: Dict[str, Tuple[Tuple[spec.TensorSpec, ...], Callable[[Sequence[np.ndarray]], np.ndarray]]] = {
    spec.ENSEMBLE_MODEL: (spec.ENSEMBLE_INPUTS, preprocess),
    spec.UINT8_ENSEMBLE_MODEL: (spec.UINT8_ENSEMBLE_INPUTS, preprocess_uint8),
}


def photos() -> List[np.ndarray]:
    """The photographs, uint8 RGB (H, W, 3) arrays of assorted sizes, in file order."""
    return [photo(name) for name in PHOTOS]


def filename(model: str) -> str:
    return f"{model}.json"


def encode(tensor: np.ndarray, datatype: str) -> Dict[str, str]:
    """One batch-1 tensor as perf_analyzer's `{"b64": ...}`: raw row-major little-endian bytes."""
    raw = np.ascontiguousarray(tensor, dtype=NUMPY_DTYPES[datatype]).tobytes(order="C")
    return {"b64": base64.b64encode(raw).decode("ascii")}


def decode(content: Dict[str, str], datatype: str, dims: Sequence[int]) -> np.ndarray:
    """The inverse of `encode`; raises ValueError if the byte size does not fit `dims`."""
    raw = base64.b64decode(content["b64"], validate=True)
    dtype = NUMPY_DTYPES[datatype]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{len(raw)} bytes do not make a {datatype} tensor of dims {list(dims)} ({expected} bytes)")
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(dims))


def input_data(model: str, images: Optional[Sequence[np.ndarray]] = None, repeat: int = 1) -> dict:
    """The `--input-data` document for one ensemble: one entry per image, in order, each `repeat` times in a row.

    At concurrency c perf_analyzer 2.41 sends only every c-th entry (measured: of 20 entries at concurrency 2,
    the odd ones never); with each image repeated a multiple of c times, every image is sent alike."""
    inputs, make = ENSEMBLES[model]
    if len(inputs) != 1:
        raise ValueError(f"{model} has {len(inputs)} inputs; this generator fills exactly one")
    (tensor,) = inputs
    batch = make(photos() if images is None else images)
    dims = tensor.resolve(spec.REFERENCE_DIMS)  # input dims are plain integers
    if batch.dtype != NUMPY_DTYPES[tensor.datatype] or batch.shape[1:] != dims:
        raise ValueError(
            f"{model}: preprocessing gave {batch.dtype} {batch.shape[1:]}, the spec says {tensor.datatype} {dims}"
        )
    return {"data": [{tensor.name: encode(image, tensor.datatype)} for image in batch for _ in range(repeat)]}


def render(document: dict) -> str:
    """Deterministic text: one tensor per line, so a change shows as a change of whole entries."""
    return json.dumps(document, indent=2) + "\n"


def write(output: Path = DEFAULT_OUTPUT) -> List[Path]:
    output.mkdir(parents=True, exist_ok=True)
    images = photos()
    written = []
    for model in ENSEMBLES:
        path = output / filename(model)
        path.write_text(render(input_data(model, images)), encoding="ascii")
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_data", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="directory for the JSON files (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    for path in write(args.output):
        print(f"{path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
