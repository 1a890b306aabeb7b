"""`safety-checker scan` in the benchmark: does the client keep the server saturated, and what can one client core do?

Two runs of the real command, as a user runs it, over a folder of real-size
files (the scikit-image photographs and their mirror images, as PNG and JPEG:
300x451 to 2000x2000 pixels, each decoded, resized and cropped by the
client):

- against the full-size served checker (the tiny one with --quick), with the
  scan's default options (the window of requests in flight sized from the
  server's answers, `--concurrency auto`), to compare with perf_analyzer's best
  fp32 throughput on the same server in the same run (`scan_vs_server`; the
  goal is >= 0.95);
- against a tiny checker, where the server costs almost nothing, so the client
  is the limit: images/s, and images per second of client CPU time (every
  thread of the scan process), the ceiling per client core.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fixtures.photos import PHOTOS, photo

_SUMMARY = re.compile(
    r"this run: (?P<images>\d+) images checked in .*?\((?P<rate>[\d.]+) images/s, client CPU (?P<cpu>[\d.]+) s\)"
)


def encoded_photos() -> List[bytes]:
    """Every sample photograph and its mirror image, as PNG and as JPEG (quality 90)."""
    from PIL import Image

    files = []
    for name in PHOTOS:
        pixels = photo(name)
        for image in (pixels, pixels[:, ::-1]):
            for form, options in (("PNG", {}), ("JPEG", {"quality": 90})):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, form, **options)
                files.append(buffer.getvalue())
    return files


def write_folder(folder: Path, count: int) -> Path:
    """`count` real-size image files, cycling through the encoded photographs: each written once, the rest hard
    links to it (a scan of many minutes' work needs no gigabytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = encoded_photos()
    first: Dict[int, Path] = {}
    for i in range(count):
        data = files[i % len(files)]
        extension = "png" if data[:4] == b"\x89PNG" else "jpg"
        path = folder / f"{i:05d}.{extension}"
        if i % len(files) in first:
            os.link(first[i % len(files)], path)
        else:
            path.write_bytes(data)
            first[i % len(files)] = path
    return folder


def run_scan(
    url: str,
    folder: Path,
    log: Path,
    concurrency: Optional[int] = None,
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    env: Optional[Mapping[str, str]] = None,
) -> Dict[str, Any]:
    """One `safety-checker scan` over `folder` with the scan's own defaults but for the options given; its summary's
    numbers, and the rates of the two halves of its run (from its report's lines as they were written) and their
    spread."""
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as scratch:
        report = Path(scratch) / "report.jsonl"
        command = [sys.executable, "-m", "safety_checker_client.cli", "scan", str(folder), "--url", url]
        command += ["--report", str(report)]
        for option, value in (("--concurrency", concurrency), ("--batch-size", batch_size), ("--workers", workers)):
            command += [option, str(value)] if value else []
        stdout, stderr = Path(scratch) / "stdout", Path(scratch) / "stderr"
        with stdout.open("w") as out, stderr.open("w") as err:
            process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
            samples = _watch(process, report)
        printed = stdout.read_text()
        log.write_text(f"$ {' '.join(command)}\n{printed}\n{stderr.read_text()}")
        found = _SUMMARY.search(printed)
        if process.returncode != 0 or found is None:
            raise RuntimeError(f"safety-checker scan failed (exit {process.returncode}); see {log}")
    images, rate, cpu = int(found["images"]), float(found["rate"]), float(found["cpu"])
    halves = halves_images_per_s(samples)
    return {
        "images": images,
        "images_per_s": rate,
        "client_cpu_s": cpu,
        "images_per_client_cpu_s": images / cpu if cpu > 0 else None,
        "concurrency": concurrency or "default",
        "batch_size": batch_size or "default",
        "halves_images_per_s": halves,
        "spread": (max(halves) - min(halves)) / rate if halves and rate else None,
    }


def _watch(process: subprocess.Popen, report: Path, every_s: float = 1.0) -> List[Tuple[float, int]]:
    """(seconds, report lines) every `every_s` until the scan exits: how its checked images accrued. Each poll reads
    only what the scan wrote since the last one."""
    samples: List[Tuple[float, int]] = []
    started, lines, handle = time.monotonic(), 0, None
    try:
        while True:
            try:
                returned = process.wait(timeout=every_s)
            except subprocess.TimeoutExpired:
                returned = None
            if handle is None and report.exists():
                handle = report.open("rb")
            if handle is not None:
                lines += handle.read().count(b"\n")
            samples.append((time.monotonic() - started, lines))
            if returned is not None:
                return samples
    finally:
        if handle is not None:
            handle.close()


def halves_images_per_s(samples: Sequence[Tuple[float, int]]) -> List[float]:
    """The rates of the first and second half of the time from the first line written to the last: how steady the
    scan ran (empty when too few samples fall between)."""
    moving = [(t, n) for t, n in samples if n > 0]
    if len(moving) < 3 or moving[-1][1] == moving[0][1]:
        return []
    first, last = moving[0], max(moving, key=lambda s: s[1])
    middle_t = (first[0] + last[0]) / 2
    middle = min(moving, key=lambda s: abs(s[0] - middle_t))
    return [(b[1] - a[1]) / (b[0] - a[0]) for a, b in ((first, middle), (middle, last)) if b[0] > a[0]]
