"""A candidate's windows pooled into its row of results.json: the rate over all rounds and their spread."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from bench import pipeline, served
from bench.candidates import PERF_KINDS, Candidate
from bench.loadgen import LoadResult
from safety_checker_client import spec

# The rows the in-house load generator measures: image files straight to Triton, and through the gateway.
LOADGEN_KINDS = ("triton-images", "gateway", pipeline.GATEWAY_KIND)


def pooled_row(candidate: Candidate) -> Dict[str, Any]:
    """One row of results.json from a candidate's windows."""
    if candidate.kind in LOADGEN_KINDS:
        pooled = _pooled_loadgen_row(candidate)
    elif candidate.kind in PERF_KINDS:
        pooled = _pooled_perf_row(candidate)
    else:
        pooled = _pooled_worker_row(candidate)
    row = {"name": candidate.name, "kind": candidate.kind, **candidate.extra, **pooled}
    if candidate.kind in (pipeline.KIND, pipeline.GATEWAY_KIND):
        row.update(pipeline.row_extras(row))
    return row


def _pooled_worker_row(candidate: Candidate) -> Dict[str, Any]:
    images = sum(w["images"] for w in candidate.windows)
    seconds = sum(w["seconds"] for w in candidate.windows)
    latencies = [x for w in candidate.windows for x in w["latencies_ms"]]
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    rates = [w["images"] / w["seconds"] for w in candidate.windows]
    return {
        "images_per_s": images / seconds,
        "windows_images_per_s": rates,
        "spread": served.spread(rates, images / seconds),
        "images": images,
        "seconds": seconds,
        "calls": len(latencies),
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "mean": float(np.mean(latencies))},
    }


def _pooled_loadgen_row(candidate: Candidate) -> Dict[str, Any]:
    results: List[LoadResult] = [w["result"] for w in candidate.windows]
    pooled = LoadResult(
        concurrency=results[0].concurrency,
        batch=results[0].batch,
        requests=sum(r.requests for r in results),
        window_s=sum(r.window_s for r in results),
        latencies_ms=[x for r in results for x in r.latencies_ms],
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), None),
        server=served.pooled_server_stats([r.server for r in results]),
        cycles=sum(r.cycles for r in results),
        cycle_s=sum(r.cycle_s for r in results),
        client_cpu_s=sum(r.client_cpu_s or 0.0 for r in results),
    )
    # Completions in the window, as perf_analyzer counts: with eight clients of about a second per request, a
    # window holds one or two whole cycles per client, and the cycles that fit are the short ones.
    rates = [r.completed_images_per_s for r in results]
    rate = pooled.completed_images_per_s
    row = {
        **pooled.as_dict(),
        "images_per_s": rate,
        "windows_images_per_s": rates,
        "spread": served.spread(rates, rate),
        "client_cpu_ms_per_image": cpu_ms_per_image(pooled.client_cpu_s, pooled.images),
    }
    if candidate.kind in ("gateway", pipeline.GATEWAY_KIND):
        gateway_cpu = sum(w["gateway_cpu_s"] for w in candidate.windows)
        row["gateway_cpu_s"] = gateway_cpu
        row["gateway_cpu_ms_per_image"] = cpu_ms_per_image(gateway_cpu, pooled.images)
    return row


def cpu_ms_per_image(cpu_s: float, images: int) -> Optional[float]:
    """CPU time spent in the windows over the images completed in them; None without images."""
    return 1e3 * cpu_s / images if images else None


def _pooled_perf_row(candidate: Candidate) -> Dict[str, Any]:
    row = served.pooled(candidate.windows)
    cascade_model = candidate.extra.get("cascade_model")
    if cascade_model:  # images the fp32 embedder recomputed / images the cascade answered
        answered = row["server"][cascade_model]["inferences"]
        row["fallback_fraction"] = row["server"][spec.EMBEDDER_MODEL]["inferences"] / answered if answered else None
    return row
