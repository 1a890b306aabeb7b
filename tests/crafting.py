"""Inputs for the parity tests: varied images, and pixels crafted onto a threshold.

A crafted input is found by searching along the straight line between two
pixel arrays for the point where one concept's cosine (as diffusers computes
it) equals threshold + margin. Margins that matter are the rounding tie at
0.0005 and its neighbours, and the same points shifted by the special-care
0.01, where only the adjustment decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from export.onnx_export import reference_outputs

# The margins are defined once, in export.stress, which also measures int8 at them.
from export.stress import CASCADE_MARGINS, PLAIN_MARGINS, TIE_OFFSET
from safety_checker_client.preprocess import normalization_table


@dataclass
class Crafted:
    pixels: np.ndarray  # [3, 224, 224]
    concept: int
    margin: float  # the margin that was aimed at
    achieved: float  # cos - threshold as diffusers computes it, float64
    cascade: bool


def _cosines(checker, pixels: np.ndarray):
    """(concept, special-care) float32 cosines of a pixel batch, as diffusers computes them."""
    out = reference_outputs(checker, torch.from_numpy(np.ascontiguousarray(pixels)))
    return out["concept_cosines"], out["special_cosines"]


def varied_inputs(rng: np.random.Generator, count: int) -> np.ndarray:
    """Noise of random level and contrast per channel, smooth gradients and blocks, as pixel_values of real
    images can be."""
    images = np.empty((count, 3, 224, 224), dtype=np.float32)
    grid = np.linspace(-1.0, 1.0, 224, dtype=np.float32)
    for i in range(count):
        kind = i % 3
        mean = rng.uniform(-1.5, 1.5, size=(3, 1, 1))
        if kind == 0:
            images[i] = mean + rng.uniform(0.05, 1.5) * rng.standard_normal((3, 224, 224))
        elif kind == 1:
            fx, fy = rng.uniform(-3, 3, size=2)
            images[i] = mean + rng.uniform(0.2, 1.5) * np.sin(fx * grid[None, :] + fy * grid[:, None])[None]
        else:
            blocks = rng.uniform(-1.8, 2.1, size=(3, 7, 7))
            images[i] = np.kron(blocks, np.ones((32, 32)))
    # Within what a real image's pixel_values span, per channel (uint8 0 and 255, normalised).
    low, high = normalization_table()[[0, -1]][:, :, None, None]
    return np.clip(images, low, high)


def calibrate_thresholds(checker, images: np.ndarray) -> None:
    """Set thresholds so that these images give every outcome: mostly quiet, some flagged,
    and the first special-care concept firing for about half of them."""
    cos = reference_outputs(checker, torch.from_numpy(images))
    concept_thr = np.quantile(cos["concept_cosines"], 0.97, axis=0)
    special = cos["special_cosines"]
    special_thr = np.array(
        [np.quantile(special[:, 0], 0.5), np.quantile(special[:, 1], 0.9), np.quantile(special[:, 2], 0.97)]
    )
    with torch.no_grad():
        checker.concept_embeds_weights.copy_(torch.from_numpy(concept_thr.astype(np.float32)))
        checker.special_care_embeds_weights.copy_(torch.from_numpy(special_thr.astype(np.float32)))


def _search(
    checker, a: np.ndarray, b: np.ndarray, concept: int, target: float, rounds: int = 5, points: int = 17
) -> np.ndarray:
    """The pixels on the line a -> b whose cosine to `concept` is closest to `target`."""
    lo, hi = 0.0, 1.0
    best, best_gap = a, np.inf
    for _ in range(rounds):
        ts = np.linspace(lo, hi, points)
        batch = ((1 - ts)[:, None, None, None] * a + ts[:, None, None, None] * b).astype(np.float32)
        gaps = _cosines(checker, batch)[0][:, concept].astype(np.float64) - target
        closest = int(np.argmin(np.abs(gaps)))
        if abs(gaps[closest]) < best_gap:
            best, best_gap = batch[closest], abs(gaps[closest])
        crossings = np.flatnonzero(np.sign(gaps[:-1]) != np.sign(gaps[1:]))
        if len(crossings) == 0:
            break
        k = int(crossings[0])
        lo, hi = ts[k], ts[k + 1]
    return best


def craft(checker, pool: np.ndarray, rng: np.random.Generator, per_margin: int) -> List[Crafted]:
    """Crafted inputs for every margin in PLAIN_MARGINS and CASCADE_MARGINS."""
    concept_thr = checker.concept_embeds_weights.double().numpy()
    special_thr = checker.special_care_embeds_weights.double().numpy()
    cos, special = _cosines(checker, pool)
    cos = cos.astype(np.float64) - concept_thr
    special = special.astype(np.float64) - special_thr
    # End points on which the first special-care concept fires (or stays quiet)
    # with room to spare, and the other special-care concepts stay quiet.
    others_quiet = (special[:, 1:] < -0.004).all(axis=1)
    fired, quiet = others_quiet & (special[:, 0] > 0.004), others_quiet & (special[:, 0] < -0.004)
    crafted: List[Crafted] = []
    for cascade, margins in ((False, PLAIN_MARGINS), (True, CASCADE_MARGINS)):
        eligible = fired if cascade else quiet
        adjustment = 0.01 if cascade else 0.0
        for margin in margins:
            made = 0
            for _ in range(200):
                if made == per_margin:
                    break
                concept = int(rng.integers(0, concept_thr.size))
                rest_quiet = (np.delete(cos, concept, axis=1) + adjustment < -0.004).all(axis=1)
                low = np.flatnonzero(eligible & rest_quiet & (cos[:, concept] < margin - 0.01))
                high = np.flatnonzero(eligible & rest_quiet & (cos[:, concept] > margin + 0.01))
                if len(low) == 0 or len(high) == 0:
                    continue
                a, b = pool[rng.choice(low)], pool[rng.choice(high)]
                pixels = _search(checker, a, b, concept, concept_thr[concept] + margin)
                item = _describe(checker, pixels, concept, margin, cascade, concept_thr, special_thr)
                if item is not None:
                    crafted.append(item)
                    made += 1
    return crafted


def _describe(checker, pixels, concept, margin, cascade, concept_thr, special_thr) -> Optional[Crafted]:
    """Keep a crafted input only if the aimed-at margin alone decides the image."""
    cos, special = _cosines(checker, pixels[None])
    margins = cos[0].astype(np.float64) - concept_thr
    special = special[0].astype(np.float64) - special_thr
    achieved = margins[concept]
    if abs(achieved - margin) > TIE_OFFSET / 4:
        return None
    others = np.delete(margins, concept)
    adjustment = 0.01 if cascade else 0.0
    first_special_ok = special[0] > 0.002 if cascade else special[0] < -0.002
    if not first_special_ok or (special[1:] > -0.002).any() or (others + adjustment > -0.002).any():
        return None
    return Crafted(pixels=pixels, concept=concept, margin=margin, achieved=float(achieved), cascade=cascade)


def unambiguous(checker, pixels: np.ndarray, distance: float = 1e-6) -> np.ndarray:
    """Mask of inputs whose every score is further than `distance` from a rounding boundary.

    A random input can land within the float32 noise of a boundary, where two
    correct implementations may round differently; those are left out of the
    exact comparisons (with or without the special-care adjustment).
    """
    cos, special = _cosines(checker, pixels)
    thresholds = np.concatenate(
        [checker.concept_embeds_weights.double().numpy(), checker.special_care_embeds_weights.double().numpy()]
    )
    margins = np.concatenate([cos, special], axis=1).astype(np.float64) - thresholds
    keep = np.ones(len(pixels), dtype=bool)
    for adjustment in (0.0, 0.01):
        thousandths = (margins + adjustment) * 1000
        keep &= (np.abs(thousandths - np.floor(thousandths) - 0.5) > distance * 1000).all(axis=1)
    return keep
