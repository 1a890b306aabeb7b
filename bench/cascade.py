"""Forced fallback for the cascade's benchmark: a bound that sends k of N images to fp32, in a copy of the model.

The cascade recomputes an image with fp32 when any margin lies within its
cosine bound of a decision boundary. To measure what a given fallback
fraction costs, each image's critical bound (the smallest bound at which the
served postprocessor is no longer certain of its decisions) is found by
bisection through the served postprocessor itself, on the int8 embedder's
cosines of that image alone. A bound between the k-th and (k+1)-th smallest
makes k of the N images fall back (the int8 embedder runs each image alone,
so batching does not move its cosines); the benchmark reports the fraction
it got, from Triton's statistics, beside the target.

The copies are benchmark-only models in the benchmark's own repository: a
bound below the measured one gives up the cascade's exactness.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import tritonclient.grpc as grpcclient

from bench.loadgen import infer_inputs
from safety_checker_client import spec

# Bisection steps: the bound is found to 4 / 2**40 of a cosine.
STEPS = 40
# Larger than any |margin| (cosines and thresholds lie in [-1, 1]): no image is certain at this bound.
UNCERTAIN_BOUND = 4.0


def _infer(client, model: str, inputs: Dict[str, np.ndarray], outputs: Sequence[str]) -> Dict[str, np.ndarray]:
    tensors = infer_inputs(grpcclient, inputs)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    return {name: result.as_numpy(name) for name in outputs}


def critical_bounds(url: str, embedder: str, pixels: np.ndarray) -> np.ndarray:
    """float64 [N]: per image, the smallest cosine bound at which the postprocessor is not certain of it."""
    names = [t.name for t in spec.EMBEDDER_OUTPUTS]
    client = grpcclient.InferenceServerClient(url)
    try:
        alone = [
            _infer(client, embedder, {spec.PIXEL_VALUES.name: pixels[i : i + 1]}, names) for i in range(len(pixels))
        ]
        embedded = {name: np.concatenate([a[name] for a in alone]) for name in names}
        low, high = np.zeros(len(pixels)), np.full(len(pixels), UNCERTAIN_BOUND)
        for _ in range(STEPS):
            middle = (low + high) / 2
            inputs = dict(embedded, **{spec.COSINE_BOUND.name: middle.reshape(-1, 1)})
            sure = _infer(client, spec.POSTPROCESS_MODEL, inputs, [spec.DECISION_CERTAIN.name])
            certain = sure[spec.DECISION_CERTAIN.name].reshape(-1)
            low, high = np.where(certain, middle, low), np.where(certain, high, middle)
    finally:
        client.close()
    return high


def bound_for(critical: np.ndarray, fallbacks: int) -> float:
    """A bound with exactly `fallbacks` images' critical bounds below it (halfway between neighbours)."""
    ordered = np.sort(np.asarray(critical, dtype=np.float64))
    if not 0 < fallbacks < len(ordered):
        raise ValueError(f"between 1 and {len(ordered) - 1} of {len(ordered)} images can be forced, not {fallbacks}")
    if ordered[fallbacks - 1] == ordered[fallbacks]:
        raise ValueError(f"images {fallbacks - 1} and {fallbacks} (by critical bound) cannot be told apart")
    return float((ordered[fallbacks - 1] + ordered[fallbacks]) / 2)


def add_copy(repository: Path, name: str, bound: float) -> Path:
    """`repository`/`name`: the cascade model under another name with `bound` as its cosine bound (files hard-linked,
    the config written anew)."""
    source, target = repository / spec.CASCADE_MODEL, repository / name
    shutil.copytree(source, target, copy_function=os.link)
    config = target / "config.pbtxt"
    text, names = re.subn(r'^name: "[^"]*"$', f'name: "{name}"', config.read_text(), flags=re.M)
    text, bounds = re.subn(
        r'(key: "cosine_bound"\s*value: \{ string_value: ")[^"]*(" \})', rf"\g<1>{bound!r}\g<2>", text
    )
    if (names, bounds) != (1, 1):
        raise ValueError(f"{source / 'config.pbtxt'}: expected one name and one cosine_bound, found {names}, {bounds}")
    config.unlink()  # a hard link to the source's: replace, never write through
    config.write_text(text)
    return target
