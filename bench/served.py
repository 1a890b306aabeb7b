"""The served rows of `make bench`: one perf_analyzer measurement per window, Triton's statistics around it.

Each window is one perf_analyzer run at one concurrency, with its own count
windows and stability criterion; the orchestrator interleaves these runs with
the in-process candidates, round by round, and pools the rounds of a row.
perf_analyzer's CSV and output of every window are kept.

When perf_analyzer cannot stabilise (three windows in a row within
`stability_percentage` of each other, in at most `max_trials`), it writes no
CSV; the window then takes the mean of the last three of its passes (run with
`-v`, perf_analyzer prints each pass's throughput and p95 latency) and is
marked `stable: false`, so that the row says it rather than dropping the
number. A run that fails otherwise (a refused request, a server gone) is
recorded with perf_analyzer's own words and counts as an error of the row.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tritonclient.grpc as grpcclient

from bench import perf
from bench.loadgen import stats_counters, stats_delta

# perf_analyzer's message when no three windows in a row agreed within the criterion.
UNSTABLE = "Failed to obtain stable measurement"
# What `perf_analyzer -v` prints for each pass (measurement window).
PASS = re.compile(r"Pass \[\d+\] throughput: ([0-9.eE+-]+) infer/sec\. p95 latency: (\d+) usec")
# Passes an unstable window is averaged over: perf_analyzer's own stability window.
STABILITY_WINDOW = 3


@dataclass(frozen=True)
class PerfSettings:
    """How perf_analyzer measures: windows of at least `min_requests` (and `requests_per_client` per
    outstanding request, so that bursts of a batch do not decide a window), within `stability_percentage`."""

    min_requests: int
    requests_per_client: int
    stability_percentage: int
    max_trials: int

    def request_count(self, concurrency: int) -> int:
        return max(self.min_requests, self.requests_per_client * concurrency)


def window(
    url: str,
    model: str,
    concurrency: int,
    settings: PerfSettings,
    csv_file: Path,
    stats_models: Sequence[str],
    data: Optional[Path] = None,
    batch: int = 1,
) -> Dict[str, Any]:
    """One perf_analyzer run against `model` at `url` (gRPC), `batch` images a request; its numbers (images/s:
    perf_analyzer counts a request of `batch` images as `batch` inferences) and the server's statistics."""
    count = settings.request_count(concurrency)
    arguments = perf.command(
        model,
        url,
        csv_file,
        batch=batch,
        concurrency=(concurrency,),
        request_count=count,
        stability_percentage=settings.stability_percentage,
        max_trials=settings.max_trials,
        data=data,
        extra=("-v",),
    )
    csv_file.unlink(missing_ok=True)
    control = grpcclient.InferenceServerClient(url)
    try:
        before = {name: stats_counters(control, name, "grpc") for name in stats_models}
        try:
            output, failure = perf.run(arguments), None
        except perf.PerfAnalyzerError as error:
            output, failure = error.output or str(error), error
        after = {name: stats_counters(control, name, "grpc") for name in stats_models}
    finally:
        control.close()
    csv_file.with_suffix(".log").write_text(output)  # what perf_analyzer said, beside its CSV
    measured: Dict[str, Any] = {
        "request_count": count,
        "server": {name: stats_delta(before[name], after[name]) for name in stats_models},
    }
    passes = _passes(output)
    if failure is None and csv_file.is_file():
        (row,) = perf.read_csv(csv_file)
        return {
            **measured,
            "images_per_s": perf.images_per_s(row),
            "latency_ms": perf.latency_ms(row),
            "stable": True,
            "csv": row,
        }
    if UNSTABLE in output and len(passes) >= STABILITY_WINDOW:
        last = passes[-STABILITY_WINDOW:]
        p95 = float(np.mean([latency for _, latency in last])) / 1e3
        return {
            **measured,
            "images_per_s": float(np.mean([rate for rate, _ in last])),
            "latency_ms": {"p50": None, "p95": p95, "p99": None},
            "stable": False,
            "passes": passes,
        }
    return {**measured, "error": str(failure or "perf_analyzer wrote no CSV"), "stable": True}


def _passes(output: str) -> List[Tuple[float, float]]:
    """(images/s, p95 latency in microseconds) of every pass perf_analyzer printed, in order."""
    return [(float(rate), float(latency)) for rate, latency in PASS.findall(output)]


def spread(rates: Sequence[float], centre: Optional[float]) -> Optional[float]:
    """How far apart a row's windows lie: (max - min) / the row's rate; None without windows or rate."""
    return (max(rates) - min(rates)) / centre if rates and centre else None


def pooled(windows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A row from its windows: mean throughput, the spread between windows ((max - min) / mean), every
    window's number, the mean of each latency percentile (over the stable windows; the unstable ones' p95 when
    none is stable), and the summed server statistics."""
    measured = [w for w in windows if "images_per_s" in w]
    rates = [float(w["images_per_s"]) for w in measured]
    mean = float(np.mean(rates)) if rates else None
    # Every percentile from the same windows, so that p50 <= p95 <= p99 holds: the stable ones when there are
    # any, else the unstable ones, which have their p95 only.
    latency_windows = [w for w in measured if w["stable"]] or measured
    latency = {}
    for p in ("p50", "p95", "p99"):
        values = [w["latency_ms"][p] for w in latency_windows if w["latency_ms"][p] is not None]
        latency[p] = float(np.mean(values)) if values else None
    return {
        "images_per_s": mean,
        "windows_images_per_s": rates,
        "spread": spread(rates, mean),
        "unstable_windows": sum(1 for w in windows if not w["stable"]),
        "errors": len(windows) - len(measured),
        "first_error": next((w["error"] for w in windows if "error" in w), None),
        "latency_ms": latency,
        "server": pooled_server_stats([w["server"] for w in windows]),
    }


def pooled_server_stats(windows: List[Dict[str, Dict[str, Optional[float]]]]) -> Dict[str, Dict[str, Any]]:
    """Sum the counts of every window; averages weighted by the requests they cover."""
    pooled_stats: Dict[str, Dict[str, Any]] = {}
    for model in windows[0]:
        stats = [w[model] for w in windows]
        executions = sum(s["executions"] for s in stats)
        inferences = sum(s["inferences"] for s in stats)
        entry: Dict[str, Any] = {
            "executions": executions,
            "inferences": inferences,
            "requests": sum(s["requests"] for s in stats),
            "failures": sum(s["failures"] for s in stats),
            "avg_batch_size": inferences / executions if executions else None,
        }
        for key in ("avg_queue_ms", "avg_compute_input_ms", "avg_compute_infer_ms", "avg_compute_output_ms"):
            weighted = [(s[key], s["requests"]) for s in stats if s[key] is not None]
            total = sum(n for _, n in weighted)
            entry[key] = sum(v * n for v, n in weighted) / total if total else None
        pooled_stats[model] = entry
    return pooled_stats


def keep_csv(windows: Sequence[Dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Every window's perf_analyzer CSV row in one file, led by the row and the round it belongs to."""
    rows = [{"row": label, "round": w["round"], **w["csv"]} for w, label in zip(windows, labels) if "csv" in w]
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
