"""The near-threshold stress margins, and what a change of cosines does to decisions there.

The margins are those of the parity tests (tests/crafting.py crafts pixels
onto them): the rounding tie at 0.0005 and its neighbours, and the same points
shifted by the special-care 0.01, where only the adjustment decides.

`stress_agreement` asks, for a second implementation of the embedder (the int8
model), how its decisions compare with fp32 on images sitting exactly at those
margins. A score depends only on cosine minus threshold, so placing every
concept of every checked image at each margin in turn, and adding the second
implementation's own deviation from fp32 for that image and concept, gives the
scores both would compute for such an image, without a pixel search.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from safety_checker_served.scoring import score  # the served rule itself

# The float32 noise between two correct fp32 implementations of the vision
# tower is about 2e-7, so "at" the tie means 2e-6 to either side of it.
TIE_OFFSET = 2e-6
PLAIN_MARGINS = (0.0004, 0.0005 - TIE_OFFSET, 0.0005 + TIE_OFFSET, 0.0006, -0.0004, -0.0006)
# With a fired special-care concept: margin + 0.01 lands next to the tie.
CASCADE_MARGINS = (-0.0094, -0.0095 - TIE_OFFSET, -0.0095 + TIE_OFFSET, -0.0096)
# How far a quiet concept is put below its threshold, and a fired special-care concept above.
_CLEAR = 0.1


def _placed(
    concept_thresholds: np.ndarray, special_thresholds: np.ndarray, deviation: np.ndarray, margin: float, cascade: bool
):
    """Cosines of N*K virtual images: image i with only concept k at `margin` (+ its deviation)."""
    n, k = deviation.shape
    concept = np.repeat((concept_thresholds - _CLEAR)[None], n * k, axis=0)
    rows = np.arange(n * k)
    columns = np.tile(np.arange(k), n)
    concept[rows, columns] = concept_thresholds[columns] + margin + deviation.reshape(-1)
    special = np.repeat((special_thresholds - _CLEAR)[None], n * k, axis=0)
    if cascade:
        special[:, 0] = special_thresholds[0] + _CLEAR
    return concept.astype(np.float32), special.astype(np.float32), columns


def stress_agreement(
    fp32_cosines: np.ndarray,
    other_cosines: np.ndarray,
    concept_thresholds: np.ndarray,
    special_thresholds: np.ndarray,
    adjustment: float,
) -> Dict[str, float]:
    """Decision and score agreement of `other` with fp32 at every stress margin, every concept, every image."""
    deviation = other_cosines.astype(np.float64) - fp32_cosines.astype(np.float64)
    zero = np.zeros_like(deviation)
    cases = agreeing = same_score = 0
    worst = 0.0
    for cascade, margins in ((False, PLAIN_MARGINS), (True, CASCADE_MARGINS)):
        for margin in margins:
            answers = []
            for shift in (zero, deviation):
                concept, special, columns = _placed(concept_thresholds, special_thresholds, shift, margin, cascade)
                flagged, concept_scores, _ = score(concept, special, concept_thresholds, special_thresholds, adjustment)
                answers.append((flagged, concept_scores[np.arange(len(columns)), columns]))
            (flag_a, score_a), (flag_b, score_b) = answers
            cases += len(flag_a)
            agreeing += int(np.sum(flag_a == flag_b))
            same_score += int(np.sum(score_a == score_b))
            worst = max(worst, float(np.max(np.abs(score_a - score_b))))
    return {
        "cases": cases,
        "decision_agreement": agreeing / cases,
        "score_agreement": same_score / cases,
        "max_score_deviation": round(worst, 3),
    }
