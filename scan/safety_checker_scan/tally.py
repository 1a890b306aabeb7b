"""What a scan counts: images checked, flagged (per concept), errors, files skipped (not images); the summary and
the HTML page show it."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from safety_checker_client.records import answered
from safety_checker_scan.progress import duration

# fired_concepts names the special-care concepts so; they are not counted per concept.
SPECIAL_CARE_PREFIX = "special_care_"


@dataclass
class Flagged:
    path: str
    location: str  # where the file is now (after --move-flagged)
    fired: List[str]
    top_score: float


@dataclass
class Tally:
    checked: int = 0
    flagged: int = 0
    errors: int = 0
    skipped: int = 0  # files that are not images
    per_concept: Dict[str, int] = field(default_factory=dict)
    top_scores: array = field(default_factory=lambda: array("d"))  # per answered image
    flagged_images: List[Flagged] = field(default_factory=list)
    error_lines: List[Tuple[str, str]] = field(default_factory=list)
    skipped_paths: List[str] = field(default_factory=list)

    def add(self, record: Dict[str, object], location: Optional[str] = None) -> None:
        if record.get("skipped") and not answered(record):
            self.skipped += 1
            self.skipped_paths.append(str(record.get("path")))
            return
        if not answered(record):
            self.errors += 1
            self.error_lines.append((str(record.get("path")), str(record.get("error"))))
            return
        self.checked += 1
        top = top_score(record)
        self.top_scores.append(top)
        if record["flagged"]:
            self.flagged += 1
            fired = list(record.get("fired_concepts") or [])
            for name in fired:
                if not name.startswith(SPECIAL_CARE_PREFIX):  # they never flag an image on their own
                    self.per_concept[name] = self.per_concept.get(name, 0) + 1
            path = str(record["path"])
            self.flagged_images.append(Flagged(path, location or path, fired, top))


def top_score(record: Dict[str, object]) -> float:
    """The image's highest score over the concepts that can flag it (built-in and custom); > 0 flags."""
    scores = list(record.get("concept_scores") or []) + list((record.get("custom_scores") or {}).values())
    return max(scores) if scores else math.nan


def merge(first: Tally, second: Tally) -> Tally:
    merged = Tally(
        checked=first.checked + second.checked,
        flagged=first.flagged + second.flagged,
        errors=first.errors + second.errors,
        skipped=first.skipped + second.skipped,
        top_scores=array("d", first.top_scores) + second.top_scores,
        flagged_images=first.flagged_images + second.flagged_images,
        error_lines=first.error_lines + second.error_lines,
        skipped_paths=first.skipped_paths + second.skipped_paths,
    )
    for tally in (first, second):
        for name, count in tally.per_concept.items():
            merged.per_concept[name] = merged.per_concept.get(name, 0) + count
    return merged


@dataclass
class ScanResult:
    tally: Tally
    seconds: float
    this_run: int  # answers received in this run
    already_done: int = 0  # answered in the report before this run (--resume): not checked again
    interrupted: bool = False
    file_errors: int = 0  # flagged files that could not be copied or moved
    cpu_s: float = 0.0  # this process's CPU time (every thread) during the run
    excluded_files: int = 0  # left out by --include/--exclude
    excluded_folders: int = 0  # not walked: an --exclude matched them
    windows: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # --concurrency auto: URL -> (last, largest)

    @property
    def images_per_s(self) -> Optional[float]:
        """This run's answers over this run's time; None when it received none (a rate of 0 would be a lie)."""
        return self.this_run / self.seconds if self.this_run and self.seconds > 0 else None


def rate_text(result: ScanResult) -> str:
    """This run's images/s as the summary and the page show it ("-" when this run received no answer)."""
    rate = result.images_per_s
    return "-" if rate is None else f"{rate:.{3 if rate < 10 else 2}f}"


def summary_lines(
    total: Tally, result: ScanResult, report: Optional[str] = None, html: Optional[str] = None
) -> List[str]:
    """The summary: images checked, flagged (per concept), errors, images/s."""
    files = total.checked + total.errors + total.skipped
    lines = [
        f"scanned {files} files: {total.checked} images checked, {total.flagged} flagged, {total.errors} errors"
        + (f", {total.skipped} skipped (not images)" if total.skipped else "")
        + (" (interrupted)" if result.interrupted else ""),
        f"this run: {result.this_run} images checked in {duration(result.seconds)} "
        f"({rate_text(result)} images/s, client CPU {result.cpu_s:.2f} s)"
        + (f"; {result.already_done} already checked in {report}" if result.already_done else ""),
    ]
    if result.excluded_files or result.excluded_folders:
        lines.append(
            f"excluded by --include/--exclude: {result.excluded_files} files"
            + (f" and {result.excluded_folders} folders (not walked)" if result.excluded_folders else "")
        )
    if result.windows:
        lines.append(
            "requests in flight (auto): "
            + ", ".join(f"{url} {last} at the end, {most} at most" for url, (last, most) in result.windows.items())
        )
    if total.per_concept:
        counts = sorted(total.per_concept.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append("flagged per concept: " + ", ".join(f"{name} {count}" for name, count in counts))
    if result.file_errors:
        lines.append(f"files not copied or moved: {result.file_errors} (see the errors above)")
    if report:
        lines.append(f"report: {report}")
    if html:
        lines.append(f"page: {html}")
    return lines
