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
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

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
    numbers."""
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as scratch:
        command = [
            sys.executable,
            "-m",
            "safety_checker_client.cli",
            "scan",
            str(folder),
            "--url",
            url,
            "--report",
            str(Path(scratch) / "report.jsonl"),
        ]
        for option, value in (("--concurrency", concurrency), ("--batch-size", batch_size), ("--workers", workers)):
            command += [option, str(value)] if value else []
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        log.write_text(f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}")
        found = _SUMMARY.search(result.stdout)
        if result.returncode != 0 or found is None:
            raise RuntimeError(f"safety-checker scan failed (exit {result.returncode}); see {log}")
    images, rate, cpu = int(found["images"]), float(found["rate"]), float(found["cpu"])
    return {
        "images": images,
        "images_per_s": rate,
        "client_cpu_s": cpu,
        "images_per_client_cpu_s": images / cpu if cpu > 0 else None,
        "concurrency": concurrency or "default",
        "batch_size": batch_size or "default",
    }
