"""The decision rule of diffusers' StableDiffusionSafetyChecker.forward(), vectorised.

diffusers loops over images and concepts with NumPy scalars: a float32 cosine
minus a Python-float threshold plus a Python-float adjustment, which NumPy 1.x
(the one Triton's Python backend runs) computes in float64, then `round(x, 3)`,
i.e. NumPy's multiply-by-1000, round-half-to-even, divide. The same operations
in the same order on float64 arrays give bit-identical scores for every image
of a batch at once. Only the special-care cascade is sequential (a fired
special-care concept raises the adjustment for the ones after it), so it loops
over those few columns, never over images.

Two extensions keep that rule and reduce to it exactly at their defaults:

* strictness: the adjustment starts at the strictness value (diffusers' 0.0)
  instead of 0.0, and a fired special-care concept sets it to strictness +
  0.01 instead of 0.01, so every threshold moves by the same amount. With
  strictness 0.0 these are the reference's 0.0 and 0.01, bit for bit.
* custom concepts: float32 cosines to the operator's concepts, scored with the
  same formula and the same per-image adjustment as the built-in concepts;
  one that fires flags the image.
"""

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np

from safety_checker_client.spec import SPECIAL_CARE_ADJUSTMENT


class Scores(NamedTuple):
    flagged: np.ndarray  # bool [N]: a built-in or a custom concept fired
    concept_scores: np.ndarray  # float64 [N, K]
    special_scores: np.ndarray  # float64 [N, S]
    custom_scores: np.ndarray  # float64 [N, C]


def score_all(
    concept_cosines: np.ndarray,
    special_cosines: np.ndarray,
    concept_thresholds: np.ndarray,
    special_thresholds: np.ndarray,
    special_care_adjustment: float = SPECIAL_CARE_ADJUSTMENT,
    strictness: Union[float, np.ndarray] = 0.0,
    custom_cosines: Optional[np.ndarray] = None,
    custom_thresholds: Optional[np.ndarray] = None,
) -> Scores:
    """Score a batch. `strictness` is one float or a float64 array with one value per image."""
    special = special_cosines.astype(np.float64)
    count = special.shape[0]
    base = np.broadcast_to(np.asarray(strictness, dtype=np.float64), (count,)).copy()
    raised = base + special_care_adjustment
    adjustment = base
    special_scores = np.empty_like(special)
    for j in range(special.shape[1]):
        special_scores[:, j] = np.round(special[:, j] - special_thresholds[j] + adjustment, 3)
        # Set, not added: several fired special-care concepts still give +0.01.
        adjustment = np.where(special_scores[:, j] > 0, raised, adjustment)
    concept_scores = np.round(
        concept_cosines.astype(np.float64) - concept_thresholds[np.newaxis, :] + adjustment[:, np.newaxis], 3
    )
    if custom_cosines is None or custom_cosines.shape[1] == 0:
        custom_scores = np.zeros((count, 0), dtype=np.float64)
    else:
        custom_scores = np.round(
            custom_cosines.astype(np.float64)
            - np.asarray(custom_thresholds, dtype=np.float64)[np.newaxis, :]
            + adjustment[:, np.newaxis],
            3,
        )
    flagged = np.any(concept_scores > 0, axis=1) | np.any(custom_scores > 0, axis=1)
    return Scores(flagged, concept_scores, special_scores, custom_scores)


def score(
    concept_cosines: np.ndarray,
    special_cosines: np.ndarray,
    concept_thresholds: np.ndarray,
    special_thresholds: np.ndarray,
    special_care_adjustment: float = SPECIAL_CARE_ADJUSTMENT,
    strictness: Union[float, np.ndarray] = 0.0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (flagged [N], concept_scores [N, K], special_scores [N, S]), scores in float64."""
    flagged, concept_scores, special_scores, _ = score_all(
        concept_cosines, special_cosines, concept_thresholds, special_thresholds, special_care_adjustment, strictness
    )
    return flagged, concept_scores, special_scores


def cosines(image_embeds: np.ndarray, unit_concepts: np.ndarray) -> np.ndarray:
    """float32 [N, C]: diffusers' cosine_distance (normalise the embeddings, matmul) in float32.

    `unit_concepts` [C, D] is already normalised, as the built-in concepts are in the ONNX graph.
    """
    embeds = np.asarray(image_embeds, dtype=np.float32)
    if unit_concepts.shape[0] == 0:
        return np.zeros((embeds.shape[0], 0), dtype=np.float32)
    norms = np.sqrt(np.sum(embeds * embeds, axis=1, keepdims=True, dtype=np.float32))
    normalized = embeds / np.maximum(norms, np.float32(1e-12))
    return np.matmul(normalized, unit_concepts.T).astype(np.float32)


# A score fires when its unrounded margin is above this: round(x, 3) is 0.001 or more exactly then (round half
# to even sends 0.0005 itself to 0.000).
FIRING_EDGE = 0.0005


def certain(
    concept_cosines: np.ndarray,
    special_cosines: np.ndarray,
    concept_thresholds: np.ndarray,
    special_thresholds: np.ndarray,
    special_care_adjustment: float,
    strictness: np.ndarray,
    custom_cosines: np.ndarray,
    custom_thresholds: np.ndarray,
    bound: np.ndarray,
) -> np.ndarray:
    """bool [N]: whether every decision of each image would stand for any cosines within `bound` [N] of these.

    Each margin (cosine - threshold + adjustment) must lie farther than the bound from FIRING_EDGE. The
    special-care concepts are checked first and in order: only when each one's firing is certain is the
    adjustment it sets for the later ones, and for every concept, certain too. A cosine to a unit concept vector
    moves by at most the distance between the two normalised embeddings, so one bound serves the built-in,
    special-care and custom concepts alike. With a bound of 0 (fp32 cosines) every image is certain.
    """
    bound = np.asarray(bound, dtype=np.float64).reshape(-1)
    special = special_cosines.astype(np.float64)
    base = np.broadcast_to(np.asarray(strictness, dtype=np.float64), (special.shape[0],))
    adjustment = base.copy()
    sure = np.ones(special.shape[0], dtype=bool)
    for j in range(special.shape[1]):
        margin = special[:, j] - special_thresholds[j] + adjustment
        sure &= np.abs(margin - FIRING_EDGE) > bound
        adjustment = np.where(np.round(margin, 3) > 0, base + special_care_adjustment, adjustment)
    for cosines, thresholds in ((concept_cosines, concept_thresholds), (custom_cosines, custom_thresholds)):
        if cosines.shape[1]:
            margins = cosines.astype(np.float64) - np.asarray(thresholds, dtype=np.float64)[np.newaxis, :]
            margins += adjustment[:, np.newaxis]
            sure &= np.all(np.abs(margins - FIRING_EDGE) > bound[:, np.newaxis], axis=1)
    return sure | (bound == 0)


def nonfinite_refusal(counts: np.ndarray) -> Optional[str]:
    """Why a request must not get a decision, from the embedder's count of NaN or Inf pixels per image; None when
    every pixel was finite. In the reference such an image silently comes out "safe"."""
    counts = np.asarray(counts).reshape(-1)
    if not np.any(counts > 0):
        return None
    detail = ", ".join(f"image {i}: {counts[i]}" for i in np.flatnonzero(counts)[:8])
    return f"pixel_values holds non-finite values (NaN or Inf) ({detail}); nothing in this request was checked"
