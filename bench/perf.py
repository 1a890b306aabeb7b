"""NVIDIA's perf_analyzer, run against a served model with the committed input data.

`make setup` installs it into a prefix of its own (requirements/perf-analyzer.txt:
the tritonclient 2.41.0 wheel ships the binary), so the client's tritonclient
stays current. The binary links libcudart.so.12 even when it never touches a
GPU; the PyPI CUDA runtime in the same prefix provides it.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
PREFIX = ROOT / ".perf-analyzer"
INPUT_DATA = Path(__file__).resolve().parent / "perf_analyzer"


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing or did not complete; the message holds its own words, `output` all of them."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def binary(prefix: Path = PREFIX) -> Path:
    path = prefix / "bin" / "perf_analyzer"
    if not path.is_file():
        raise PerfAnalyzerError(f"{path} not found: `make setup` installs perf_analyzer there")
    return path


def environment(prefix: Path = PREFIX) -> Dict[str, str]:
    """This environment with the prefix's CUDA runtime on the library path."""
    libraries = [str(p) for p in prefix.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib")]
    if not libraries:
        raise PerfAnalyzerError(f"no CUDA runtime library under {prefix}: `make setup` installs it there")
    path = os.pathsep.join([*libraries, os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, LD_LIBRARY_PATH=path)


def input_data(model: str) -> Path:
    """The committed --input-data file of a served ensemble (bench/perf_data.py writes them)."""
    return INPUT_DATA / f"{model}.json"


def command(
    model: str,
    url: str,
    csv_file: Path,
    *,
    protocol: str = "grpc",
    batch: int = 1,
    concurrency: Sequence[int] = (1,),
    measurement_ms: int = 5000,
    request_count: Optional[int] = None,
    stability_percentage: int = 10,
    max_trials: int = 10,
    data: Optional[Path] = None,
    extra: Sequence[str] = (),
) -> List[str]:
    """perf_analyzer's concurrency mode with its own measurement windows and stability criterion.

    Windows last `measurement_ms`, or, given `request_count`, until that many requests completed
    (count_windows: with a second per request, a time window would hold a handful, and one more or
    less would be a 20% swing). `data` replaces the model's committed input file.
    """
    low, high = min(concurrency), max(concurrency)
    step = concurrency[1] - concurrency[0] if len(concurrency) > 1 else 1
    windows = (
        [f"--measurement-interval={measurement_ms}"]
        if request_count is None
        else ["--measurement-mode=count_windows", f"--measurement-request-count={request_count}"]
    )
    return [
        str(binary()),
        "-m",
        model,
        "-i",
        protocol,
        "-u",
        url,
        "--input-data",
        str(data or input_data(model)),
        "-b",
        str(batch),
        f"--concurrency-range={low}:{high}:{step}",
        *windows,
        f"--stability-percentage={stability_percentage}",
        f"--max-trials={max_trials}",
        "--percentile=95",
        "-f",
        str(csv_file),
        "--verbose-csv",
        *extra,
    ]


def run(arguments: Sequence[str], timeout_s: float = 900) -> str:
    """Run perf_analyzer; its standard output, or PerfAnalyzerError with the end of what it said."""
    try:
        result = subprocess.run(list(arguments), env=environment(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise PerfAnalyzerError(f"perf_analyzer did not finish in {timeout_s:g} s") from error
    if result.returncode != 0:
        output = result.stdout + result.stderr
        said = output.strip().splitlines()[-8:]
        raise PerfAnalyzerError(f"perf_analyzer exited with {result.returncode}: " + " | ".join(said), output)
    return result.stdout


def read_csv(path: Path) -> List[Dict[str, str]]:
    """One row per concurrency, as perf_analyzer writes them (column names are its own)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def images_per_s(row: Dict[str, str]) -> Optional[float]:
    """perf_analyzer counts inferences, i.e. images (a batch of 8 counts 8)."""
    value = row.get("Inferences/Second")
    return float(value) if value not in (None, "") else None


def latency_ms(row: Dict[str, str]) -> Dict[str, Optional[float]]:
    """The client-side percentiles of a CSV row (perf_analyzer writes microseconds)."""
    return {
        name: float(row[column]) / 1e3 if row.get(column) not in (None, "") else None
        for name, column in (("p50", "p50 latency"), ("p95", "p95 latency"), ("p99", "p99 latency"))
    }
