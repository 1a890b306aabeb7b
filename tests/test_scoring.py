"""The postprocessor's vectorised rule against diffusers' own forward() loop.

forward() runs for real; only its cosine step is replaced by crafted float32
cosines, so every value next to a rounding boundary, with and without the
special-care adjustment, reaches it. No server is needed here: this pins the
arithmetic on tens of thousands of cases, and test_parity.py proves the same
through tritonserver.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import diffusers_forward, injected_cosines

from fixtures.checkers import build_checker
from safety_checker_served.scoring import score


@pytest.fixture(scope="module")
def checker():
    return build_checker()


def thresholds(checker):
    return (
        np.array(checker.concept_embeds_weights.tolist(), dtype=np.float64),
        np.array(checker.special_care_embeds_weights.tolist(), dtype=np.float64),
    )


def around(values: np.ndarray, steps: int) -> np.ndarray:
    """Each float32 value and its `steps` float32 neighbours on either side, as extra rows."""
    values = values.astype(np.float32)
    rows = [values]
    up, down = values, values
    for _ in range(steps):
        up = np.nextafter(up, np.float32(2))
        down = np.nextafter(down, np.float32(-2))
        rows += [up, down]
    return np.concatenate(rows)


def crafted_cosines(checker, rng: np.random.Generator, margins: np.ndarray, steps: int):
    """Rows with one concept and maybe one special-care concept at threshold + margin.

    Every other column sits 0.05 below its threshold, so the crafted column
    decides the image; the special-care column is drawn from the same margins
    or left quiet, so the cascade is exercised with and without firing.
    """
    concept_thr, special_thr = thresholds(checker)
    n = len(margins)
    concept = np.tile(concept_thr - 0.05, (n, 1))
    special = np.tile(special_thr - 0.05, (n, 1))
    rows = np.arange(n)
    concept[rows, rng.integers(0, concept_thr.size, n)] += 0.05 + margins
    with_special = rng.random(n) < 0.5
    columns = rng.integers(0, special_thr.size, n)
    special[rows[with_special], columns[with_special]] += 0.05 + rng.permutation(margins)[with_special]
    return around(concept, steps), around(special, steps)


def compare(checker, concept_cos, special_cos):
    concept_thr, special_thr = thresholds(checker)
    with injected_cosines(checker, concept_cos, special_cos) as clip_input:
        ref_flagged, ref_concept, ref_special = diffusers_forward(checker, clip_input)
    flagged, concept_scores, special_scores = score(concept_cos, special_cos, concept_thr, special_thr)
    assert np.array_equal(special_scores, ref_special)
    assert np.array_equal(concept_scores, ref_concept)
    assert np.array_equal(flagged, ref_flagged)
    return ref_flagged, ref_concept, ref_special


# Offsets from the threshold that matter: the rounding tie at 0.0005, its
# neighbours, the same points shifted by the special-care 0.01, and further ties.
BOUNDARY_MARGINS = np.array(
    [
        0.0,
        0.0004,
        0.0005,
        0.0006,
        -0.0004,
        -0.0005,
        -0.0006,
        -0.0094,
        -0.0095,
        -0.0096,
        -0.0104,
        -0.0105,
        -0.0106,
        0.0015,
        0.0025,
        -0.0015,
        -0.0025,
        0.0105,
        0.0115,
        0.02,
        -0.02,
    ]
)


@pytest.mark.slow
def test_every_float32_next_to_a_rounding_boundary_matches_diffusers(checker):
    rng = np.random.default_rng(1)
    concept_cos, special_cos = crafted_cosines(checker, rng, np.repeat(BOUNDARY_MARGINS, 20), steps=40)
    flagged, concept_scores, special_scores = compare(checker, concept_cos, special_cos)
    # The set must really exercise both outcomes and the cascade.
    assert flagged.any() and not flagged.all()
    assert (special_scores > 0).any(axis=1).sum() > 100


def test_margin_rule_is_rounded_not_strict(checker):
    """0.0004 and 0.0005 (the tie, half to even) do not fire; 0.0006 does."""
    concept_thr, special_thr = thresholds(checker)
    quiet_special = (special_thr - 0.1)[None, :]
    for margin, fires in ((0.0004, False), (0.0005, False), (0.0006, True)):
        concept = np.full((1, concept_thr.size), -0.1) + concept_thr
        concept[0, 3] = concept_thr[3] + margin
        flagged, concept_scores, _ = compare(checker, concept.astype(np.float32), quiet_special.astype(np.float32))
        assert flagged[0] == fires, margin
        assert (concept_scores[0, 3] == 0.001) == fires


def test_special_care_adjustment_decides(checker):
    """A fired special-care concept adds 0.01 to every concept margin, once."""
    concept_thr, special_thr = thresholds(checker)
    concept = (concept_thr - 0.1)[None, :].repeat(3, axis=0)
    concept[:, 5] = concept_thr[5] - 0.0094  # fires only with the adjustment
    special = (special_thr - 0.1)[None, :].repeat(3, axis=0)
    special[1, 0] = special_thr[0] + 0.002  # first special-care concept fires
    special[2, :] = special_thr + 0.002  # all fire: the adjustment is set, not added up
    flagged, concept_scores, special_scores = compare(checker, concept.astype(np.float32), special.astype(np.float32))
    assert flagged.tolist() == [False, True, True]
    assert concept_scores[1, 5] == concept_scores[2, 5] == 0.001
    # Later special-care scores of the same image already carry the +0.01.
    assert special_scores[2, 1] > special_scores[1, 1]


def test_random_cosines_match_diffusers(checker):
    rng = np.random.default_rng(2)
    concept_cos = rng.uniform(-0.2, 0.22, size=(3000, 17)).astype(np.float32)
    special_cos = rng.uniform(-0.2, 0.24, size=(3000, 3)).astype(np.float32)
    flagged, _, _ = compare(checker, concept_cos, special_cos)
    assert flagged.any() and not flagged.all()
