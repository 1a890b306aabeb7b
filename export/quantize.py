"""Optional int8 export: onnxruntime dynamic quantisation of the embedder, with its cost stated.

Dynamic quantisation stores the MatMul weights as int8 and quantises the
activations per call. It runs about 1.5x faster on an AVX2 CPU but moves
cosines by about 1e-3, twice the 5e-4 rounding step of the scores, so it can
change decisions next to a threshold. The export therefore measures, before
writing anything, how often int8 agrees with the verified fp32 model: on
random inputs with the checker's real thresholds, and on the near-threshold
stress margins (`export.stress`). The numbers are printed and stored beside
the model (`quantization.json`), so the mode is never served unlabelled.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Dict

import numpy as np

from export.stress import score, stress_agreement
from safety_checker_client import spec
from safety_checker_client.preprocess import normalize

REPORT_FILENAME = "quantization.json"
DEFAULT_CHECK_IMAGES = 16
# The measured int8 error is a maximum over the checked inputs, not a proof for every image: it is doubled.
CASCADE_SAFETY_FACTOR = 2.0


def quantize_int8(fp32_file: Path, int8_file: Path) -> None:
    """Signed int8 weights, per tensor: on this CPU the fastest and most accurate of
    QInt8, QUInt8 and per-channel reduce-range QInt8 (max cosine deviations 1.1e-3,
    1.2e-3, 1.3e-3 on the ViT-L/14 checker)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs a suggestion to pre-process the model on every call.
    logging.getLogger().setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(str(fp32_file), str(int8_file), weight_type=QuantType.QInt8)


def _outputs(path: Path, pixels: np.ndarray):
    """(concept cosines, special cosines, normalised image embeddings), one image a run, as the server runs a
    quantised model (its activations are quantised over the whole tensor it is given)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [spec.CONCEPT_COSINES.name, spec.SPECIAL_COSINES.name, spec.IMAGE_EMBEDS.name]
    runs = [session.run(names, {spec.PIXEL_VALUES.name: pixels[s : s + 1]}) for s in range(len(pixels))]
    concept, special, embeds = (np.concatenate(column) for column in zip(*runs))
    embeds = embeds.astype(np.float64)
    return concept, special, embeds / np.linalg.norm(embeds, axis=1, keepdims=True)


def compare_int8(
    fp32_file: Path, int8_file: Path, metadata: Dict[str, Any], images: int = DEFAULT_CHECK_IMAGES, seed: int = 0
) -> Dict[str, Any]:
    """Agreement of the int8 model with fp32, on random images and at the stress margins."""
    # Random uint8 images, normalised as the client does: inputs within the range of a real image's pixel_values,
    # where the cascade trusts the bound (it sends any other image to fp32).
    levels = np.random.default_rng(seed).integers(0, 256, (images, *spec.IMAGES.dims), dtype=np.uint8)
    pixels = normalize(levels)
    concept_thr = np.array([c["threshold"] for c in metadata["concepts"]], dtype=np.float64)
    special_thr = np.array([c["threshold"] for c in metadata["special_care"]], dtype=np.float64)
    adjustment = float(metadata["special_care_adjustment"])
    *fp32, fp32_unit = _outputs(fp32_file, pixels)
    *int8, int8_unit = _outputs(int8_file, pixels)
    flag_a, concept_a, special_a = score(*fp32, concept_thr, special_thr, adjustment)
    flag_b, concept_b, special_b = score(*int8, concept_thr, special_thr, adjustment)
    distance = float(np.max(np.linalg.norm(int8_unit - fp32_unit, axis=1)))
    cosine_deviation = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(fp32, int8))
    score_deviation = max(float(np.max(np.abs(concept_a - concept_b))), float(np.max(np.abs(special_a - special_b))))
    return {
        "weights": "int8 (onnxruntime quantize_dynamic, QInt8 weights, dynamic uint8 activations)",
        "max_cosine_deviation": cosine_deviation,
        # The bound the served postprocessor and the cascade use: the largest distance between int8's and fp32's
        # normalised embeddings, times the safety factor. It bounds the change of the cosine to any unit concept
        # vector (Cauchy-Schwarz), built-in, special-care or custom.
        "max_embedding_distance": distance,
        "safety_factor": CASCADE_SAFETY_FACTOR,
        "cosine_bound": CASCADE_SAFETY_FACTOR * distance,
        "random_inputs": {
            "images": images,
            "flagged_fp32": int(flag_a.sum()),
            "decision_agreement": float(np.mean(flag_a == flag_b)),
            "max_score_deviation": round(score_deviation, 3),
        },
        "stress_margins": stress_agreement(fp32[0], int8[0], concept_thr, special_thr, adjustment),
    }


def summary(report: Dict[str, Any]) -> str:
    random, stress = report["random_inputs"], report["stress_margins"]
    return (
        f"int8 vs fp32: max |cosine difference| {report['max_cosine_deviation']:.3g}, error bound "
        f"{report['cosine_bound']:.3g} ({report['safety_factor']:g} x the largest embedding distance); "
        f"random inputs ({random['images']}): decisions agree {random['decision_agreement']:.1%}, "
        f"max score deviation {random['max_score_deviation']:.3f}; "
        f"near-threshold stress ({stress['cases']} cases): decisions agree {stress['decision_agreement']:.1%}, "
        f"scores agree {stress['score_agreement']:.1%}, max score deviation {stress['max_score_deviation']:.3f}"
    )
