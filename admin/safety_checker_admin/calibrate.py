"""`safety-checker concepts calibrate`: propose a threshold from labelled example images.

Images in the positive folder should fire, those in the negative folder
should not. Each image is checked by the running server at strictness
"normal", and scored:

* with --name: its cosine to that custom concept (the server's `custom_cosines`).
  A threshold T is judged by the served rule itself, round(cos - T +
  adjustment, 3) > 0, with the image's special-care adjustment (0.01 when a
  special-care concept fired). Candidates are the multiples of 0.001 in [-1, 1].
* without: the highest built-in concept score of the image (the margin of
  the concept closest to firing). A cut c flags the images scoring above c,
  which is what strictness adjustment -c does, so the proposal is given as
  that adjustment (the request parameter `strictness_adjustment`).

The proposal maximises F1 (precision and recall together) or, with
--target-fpr, has the best recall among the thresholds whose false-positive
rate on the negatives is at most the target. Equal candidates: the middle one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, TextIO, Tuple

import numpy as np

from safety_checker_client import spec
from safety_checker_client.client import CheckError, CheckResult, SafetyCheckerClient
from safety_checker_client.preprocess import ImageError, load_image, preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class CalibrationError(RuntimeError):
    pass


@dataclass
class Operating:
    """How a threshold does on the labelled images."""

    threshold: float
    true_positives: int
    false_positives: int
    positives: int
    negatives: int

    @property
    def precision(self) -> Optional[float]:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else None

    @property
    def recall(self) -> float:
        return self.true_positives / self.positives

    @property
    def false_positive_rate(self) -> float:
        return self.false_positives / self.negatives

    @property
    def f1(self) -> float:
        precision = self.precision
        if not precision or not self.recall:
            return 0.0
        return 2 * precision * self.recall / (precision + self.recall)


def image_files(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise CalibrationError(f"{folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def check_files(client: SafetyCheckerClient, files: Sequence[Path]) -> List[CheckResult]:
    results: List[CheckResult] = []
    batch = client.max_batch_size
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        try:
            pixels = preprocess([load_image(f) for f in chunk])
            results += client.check_batch(pixels, strictness=spec.DEFAULT_STRICTNESS)
        except (ImageError, CheckError) as error:
            raise CalibrationError(str(error)) from None
    return results


def concept_scores(results: Sequence[CheckResult], name: str) -> Tuple[np.ndarray, np.ndarray]:
    """(cosines to the custom concept, special-care adjustment) per image."""
    cosines, adjustments = [], []
    for result in results:
        if name not in result.custom_cosines:
            raise CalibrationError(
                f"the server serves no custom concept named {name!r} (it serves: "
                f"{', '.join(result.custom_cosines) or 'none'}, set version "
                f"{result.concept_set_version})"
            )
        cosines.append(np.float32(result.custom_cosines[name]))
        adjustments.append(spec.SPECIAL_CARE_ADJUSTMENT if any(s > 0 for s in result.special_scores) else 0.0)
    return np.array(cosines, dtype=np.float32), np.array(adjustments, dtype=np.float64)


def operating_points(fires: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> List[Operating]:
    """`fires` [T, N]: whether each image fires at each threshold; labels [N] (True = positive)."""
    positives, negatives = int(labels.sum()), int((~labels).sum())
    true_positives = (fires & labels[np.newaxis]).sum(axis=1)
    false_positives = (fires & ~labels[np.newaxis]).sum(axis=1)
    return [
        Operating(float(t), int(tp), int(fp), positives, negatives)
        for t, tp, fp in zip(thresholds, true_positives, false_positives)
    ]


def choose(points: List[Operating], target_fpr: Optional[float]) -> Operating:
    if target_fpr is None:
        best = max(p.f1 for p in points)
        candidates = [p for p in points if p.f1 == best]
    else:
        allowed = [p for p in points if p.false_positive_rate <= target_fpr]
        if not allowed:
            raise CalibrationError(f"no threshold keeps the false-positive rate at or below {target_fpr:g}")
        best = max(p.recall for p in allowed)
        allowed = [p for p in allowed if p.recall == best]
        lowest = min(p.false_positive_rate for p in allowed)
        candidates = [p for p in allowed if p.false_positive_rate == lowest]
    return candidates[len(candidates) // 2]


def _fraction(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_histograms(
    path: Path, positive: np.ndarray, negative: np.ndarray, threshold: float, xlabel: str, title: str
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise CalibrationError(f"the plot needs matplotlib ({error}): pip install './admin[calibrate]'") from None
    values = np.concatenate([positive, negative, [threshold]]).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    pad = max((high - low) * 0.05, 1e-3)
    bins = np.linspace(low - pad, high + pad, 41)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.hist(negative, bins=bins, alpha=0.6, color="tab:blue", label=f"negative ({len(negative)})")
    axes.hist(positive, bins=bins, alpha=0.6, color="tab:red", label=f"positive ({len(positive)})")
    axes.axvline(threshold, color="black", linestyle="--", label=f"proposed threshold {threshold:.3f}")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("images")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise CalibrationError(f"cannot write {path}: {error}") from None
    finally:
        plt.close(figure)


def calibrate(
    client: SafetyCheckerClient,
    positive_dir: Path,
    negative_dir: Path,
    *,
    name: Optional[str],
    target_fpr: Optional[float],
    plot: Path,
    out: TextIO,
) -> int:
    import sys

    try:
        if target_fpr is not None and not (0.0 <= target_fpr <= 1.0 and math.isfinite(target_fpr)):
            raise CalibrationError(f"--target-fpr {target_fpr!r} must be in [0, 1]")
        positive_files, negative_files = image_files(positive_dir), image_files(negative_dir)
        positive, negative = check_files(client, positive_files), check_files(client, negative_files)
        labels = np.array([True] * len(positive) + [False] * len(negative))
        results = positive + negative
        if name is not None:
            cosines, adjustments = concept_scores(results, name)
            thresholds = np.round(np.arange(-1000, 1001) / 1000, 3)
            margins = cosines.astype(np.float64)[np.newaxis, :] - thresholds[:, np.newaxis] + adjustments
            fires = np.round(margins, 3) > 0
            values = cosines.astype(np.float64)
            what = f"cosine to {name!r}"
        else:
            values = np.array([max(r.concept_scores) for r in results], dtype=np.float64)
            low, high = math.floor(values.min() * 1000) - 1, math.ceil(values.max() * 1000) + 1
            thresholds = np.arange(low, high + 1) / 1000
            fires = values[np.newaxis, :] > thresholds[:, np.newaxis] + 1e-9
            what = "highest built-in concept score"
        points = operating_points(fires, labels, thresholds)
        chosen = choose(points, target_fpr)
        rule = "maximises F1" if target_fpr is None else f"best recall at false-positive rate <= {target_fpr:g}"
        print(f"scored {len(positive)} positive and {len(negative)} negative images by {what}", file=out)
        if name is not None:
            served = [name in r.fired_concepts for r in results]
            tp = sum(s and lab for s, lab in zip(served, labels))
            fp = sum(s and not lab for s, lab in zip(served, labels))
            now = Operating(float("nan"), tp, fp, len(positive), len(negative))
            print(
                f"as served now: precision {_fraction(now.precision)}, recall {now.recall:.3f}, false-positive "
                f"rate {now.false_positive_rate:.3f}",
                file=out,
            )
            print(f"proposed threshold: {chosen.threshold:.3f} ({rule})", file=out)
        else:
            adjustment = -chosen.threshold + 0.0
            print(f"proposed cut on the highest built-in score: {chosen.threshold:.3f} ({rule})", file=out)
            allowed = abs(adjustment) <= spec.MAX_STRICTNESS_ADJUSTMENT + 1e-12
            print(
                f"  = request parameter {spec.STRICTNESS_ADJUSTMENT_PARAMETER}={adjustment:.3f}"
                + (
                    ""
                    if allowed
                    else f" (outside the allowed [-{spec.MAX_STRICTNESS_ADJUSTMENT:g}, "
                    f"{spec.MAX_STRICTNESS_ADJUSTMENT:g}])"
                ),
                file=out,
            )
        print(
            f"  precision {_fraction(chosen.precision)} ({chosen.true_positives} of "
            f"{chosen.true_positives + chosen.false_positives} flagged are positive)",
            file=out,
        )
        print(
            f"  recall    {chosen.recall:.3f} ({chosen.true_positives} of {chosen.positives} positives flagged)",
            file=out,
        )
        print(
            f"  false-positive rate {chosen.false_positive_rate:.3f} ({chosen.false_positives} of "
            f"{chosen.negatives} negatives flagged), F1 {chosen.f1:.3f}",
            file=out,
        )
        plot_histograms(
            plot,
            values[labels],
            values[~labels],
            chosen.threshold,
            what,
            f"calibration: {name if name else 'built-in concepts'}",
        )
        print(f"wrote {plot}", file=out)
        if name is not None:
            print(
                f"apply it: safety-checker concepts set-threshold --repository DIR --url {client.url} "
                f"--name {name} --threshold {chosen.threshold:.3f}",
                file=out,
            )
    except CalibrationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
