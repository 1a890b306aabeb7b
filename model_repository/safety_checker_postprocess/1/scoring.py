"""The decision rule of diffusers' StableDiffusionSafetyChecker.forward(), vectorised.

diffusers loops over images and concepts with NumPy scalars: a float32 cosine
minus a Python-float threshold plus a Python-float adjustment, which NumPy 1.x
(the one Triton's Python backend runs) computes in float64, then `round(x, 3)`,
i.e. NumPy's multiply-by-1000, round-half-to-even, divide. The same operations
in the same order on float64 arrays give bit-identical scores for every image
of a batch at once. Only the special-care cascade is sequential (a fired
special-care concept raises the adjustment for the ones after it), so it loops
over those few columns, never over images.
"""

from typing import Tuple

import numpy as np


def score(concept_cosines: np.ndarray, special_cosines: np.ndarray, concept_thresholds: np.ndarray,
          special_thresholds: np.ndarray, special_care_adjustment: float = 0.01
          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (flagged [N], concept_scores [N, K], special_scores [N, S]), scores in float64."""
    special = special_cosines.astype(np.float64)
    adjustment = np.zeros(special.shape[0], dtype=np.float64)
    special_scores = np.empty_like(special)
    for j in range(special.shape[1]):
        special_scores[:, j] = np.round(special[:, j] - special_thresholds[j] + adjustment, 3)
        # Set, not added: several fired special-care concepts still give +0.01.
        adjustment = np.where(special_scores[:, j] > 0, special_care_adjustment, adjustment)
    concept_scores = np.round(
        concept_cosines.astype(np.float64) - concept_thresholds[np.newaxis, :] + adjustment[:, np.newaxis], 3
    )
    flagged = np.any(concept_scores > 0, axis=1)
    return flagged, concept_scores, special_scores
