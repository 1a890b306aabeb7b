"""The pipeline rows: what serving costs besides the model, on the tiny checker whose embedder costs little.

On a GPU the embedder answers thousands of images a second and everything else
(gRPC, the ensembles, the Python steps, decoding) runs on the host's cores, so
the pipeline's own ceiling is measured here, per server core, against the
embedder alone. perf_analyzer drives each path at each request batch and
concurrency, with the committed photographs (bench/pipeline_data.py): the
embedder alone, the public float ensemble, the uint8 ensemble and the
image-file ensemble; the in-house load generator drives the gateway's seed
route with the same files (bench/gateway.py). All are interleaved with the
other rows, round by round, so their ratios are measured side by side.

`pipeline_vs_embedder` is the public ensemble over the embedder alone at batch 1
and PIPELINE_CONCURRENCY; the image-file rows add the decoder's share of the
ensemble's server time (`decode_share`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import tritonclient.grpc as grpcclient

from bench import gateway, served
from bench.served import PerfSettings
from safety_checker_client import spec

# The concurrency pipeline_vs_embedder and the per-core figure are read at (the measurement point).
PIPELINE_CONCURRENCY = 8
KIND = "pipeline"
GATEWAY_KIND = "pipeline-gateway"
FLOAT, UINT8, IMAGES, EMBEDDER, GATEWAY = "float", "uint8", "images", "embedder", "gateway"

Window = Callable[[float, int], Dict[str, Any]]  # (window_s, round) -> what the window measured


class ServedPath(NamedTuple):
    """One served path: its name in the summary, the model perf_analyzer sends to, and whose statistics it reads."""

    name: str
    model: str
    steps: Sequence[str]


_SCORING = (spec.EMBEDDER_MODEL, spec.POSTPROCESS_MODEL)
PATHS = (
    ServedPath(EMBEDDER, spec.EMBEDDER_MODEL, (spec.EMBEDDER_MODEL,)),
    ServedPath(FLOAT, spec.ENSEMBLE_MODEL, (spec.ENSEMBLE_MODEL, *_SCORING)),
    ServedPath(UINT8, spec.UINT8_ENSEMBLE_MODEL, (spec.UINT8_ENSEMBLE_MODEL, spec.NORMALIZE_MODEL, *_SCORING)),
    ServedPath(
        IMAGES,
        spec.IMAGES_MODEL,
        (spec.IMAGES_MODEL, spec.DECODE_MODEL, spec.NORMALIZE_MODEL, *_SCORING, spec.VIEWS_MODEL),
    ),
)
# The composing models of the image-file ensemble, whose server time the decoder's share is taken of.
IMAGES_STEPS = (spec.DECODE_MODEL, spec.NORMALIZE_MODEL, *_SCORING, spec.VIEWS_MODEL)
GATEWAY_STEPS = (spec.IMAGES_MODEL, *IMAGES_STEPS)


def server_cores(pid: Optional[int]) -> int:
    """The cores the server process may run on (its CPU affinity), this process's when it is not known."""
    return len(os.sched_getaffinity(pid or 0))


def batch_settings(perf: PerfSettings, batch: int) -> PerfSettings:
    """`perf`, its request counts divided by `batch`: a window holds about as many images at every batch."""
    return dataclasses.replace(
        perf,
        min_requests=max(1, perf.min_requests // batch),
        requests_per_client=max(1, perf.requests_per_client // batch),
    )


def label(path: str, model: str, batch: int) -> str:
    return f"pipeline {path}: {model}, batch {batch} (tiny checker, gRPC, perf_analyzer)"


GATEWAY_LABEL = "pipeline gateway: the seed's route, one file a request (tiny checker, HTTP)"


def perf_window(
    url: str, path: ServedPath, batch: int, concurrency: int, perf: PerfSettings, data: Path, output: Path
) -> Window:
    """A window function (window_s, round) -> perf_analyzer's measurement of `path` at `batch` and `concurrency`."""
    settings = batch_settings(perf, batch)

    def window(_: float, round_number: int) -> Dict[str, Any]:
        csv_file = output / f"pipeline-{path.name}-b{batch}-c{concurrency}-round{round_number}.csv"
        return served.window(url, path.model, concurrency, settings, csv_file, path.steps, data, batch=batch)

    return window


def gateway_window(
    url: str, triton_url: str, bodies: Sequence[bytes], concurrency: int, warmup_s: float, cpu: Callable[[], float]
) -> Window:
    """A window function that drives the gateway's seed route with the pipeline's files (bench/gateway.py)."""

    def window(window_s: float, _: int) -> Dict[str, Any]:
        control = grpcclient.InferenceServerClient(triton_url)
        try:
            return gateway.measure(
                url,
                bodies,
                concurrency,
                window_s,
                warmup_s,
                triton_client=control,
                stats_models=GATEWAY_STEPS,
                gateway_cpu=cpu,
            )
        finally:
            control.close()

    return window


def decode_share(server: Dict[str, Dict[str, Any]]) -> Optional[float]:
    """The decoder's part of the image-file ensemble's server time: its compute (input, infer, output) over that
    of every composing step, each step's per-request averages times its requests; None without them."""
    totals = {}
    for model in IMAGES_STEPS:
        stats = server.get(model) or {}
        parts = [stats.get(f"avg_compute_{p}_ms") for p in ("input", "infer", "output")]
        if not stats.get("requests") or any(p is None for p in parts):
            return None
        totals[model] = sum(parts) * stats["requests"]
    whole = sum(totals.values())
    return totals[spec.DECODE_MODEL] / whole if whole else None


def per_core(row: Dict[str, Any]) -> Optional[float]:
    """A row's images/s over the cores its server may use; None without either."""
    cores, rate = row.get("server_cores"), row.get("images_per_s")
    return rate / cores if rate is not None and cores else None


def row_extras(row: Dict[str, Any]) -> Dict[str, Any]:
    """What a pooled pipeline row adds: images/s per server core and, for image files, the decoder's share."""
    extras: Dict[str, Any] = {"images_per_s_per_core": per_core(row)}
    if row.get("path") in (IMAGES, GATEWAY):
        extras["decode_share"] = decode_share(row.get("server") or {})
    return extras


def _at(rows: List[Dict[str, Any]], path: str, batch: int) -> Dict[int, Dict[str, Any]]:
    return {
        r["concurrency"]: r
        for r in rows
        if r.get("path") == path and r.get("batch") == batch and r.get("images_per_s") is not None
    }


def _ratio(numerator: Dict[str, Any], denominator: Dict[str, Any]) -> Dict[str, Any]:
    """A ratio of two rows, per interleaved round too, and its spread: (max - min) / ratio of the rounds'."""
    ratio = numerator["images_per_s"] / denominator["images_per_s"]
    by_round = [
        n / d if d else None for n, d in zip(numerator["windows_images_per_s"], denominator["windows_images_per_s"])
    ]
    measured = [r for r in by_round if r is not None]
    return {"ratio": ratio, "by_round": by_round, "spread": served.spread(measured, ratio)}


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The pipeline's keys of the summary; empty when the run measured no pipeline rows."""
    rows = [r for r in rows if r["kind"] in (KIND, GATEWAY_KIND)]
    if not rows:
        return {}
    summary: Dict[str, Any] = {}
    float_1, embedder_1 = _at(rows, FLOAT, 1), _at(rows, EMBEDDER, 1)
    shared = sorted(set(float_1) & set(embedder_1))
    at = PIPELINE_CONCURRENCY if PIPELINE_CONCURRENCY in shared else (shared[-1] if shared else None)
    if at is not None:
        ratio = _ratio(float_1[at], embedder_1[at])
        summary.update(
            {
                "pipeline_vs_embedder": ratio["ratio"],
                "pipeline_vs_embedder_spread": ratio["spread"],
                "pipeline_vs_embedder_by_round": ratio["by_round"],
                "pipeline_vs_embedder_concurrency": at,
                "pipeline_images_per_s_per_core": per_core(float_1[at]),
                "pipeline_images_per_s_per_core_spread": float_1[at]["spread"],
                "pipeline_server_cores": float_1[at]["server_cores"],
            }
        )
    summary["pipeline_by_path"] = _by_path(rows)
    uint8_vs_float = {}
    for batch in sorted({r["batch"] for r in rows if r.get("path") == UINT8}):
        uint8, floats = _at(rows, UINT8, batch), _at(rows, FLOAT, batch)
        for concurrency in sorted(set(uint8) & set(floats)):
            key = f"b{batch}c{concurrency}"
            uint8_vs_float[key] = uint8[concurrency]["images_per_s"] / floats[concurrency]["images_per_s"]
    if uint8_vs_float:
        summary["pipeline_uint8_vs_float_min"] = min(uint8_vs_float.values())
        summary["pipeline_uint8_vs_float_min_spread"] = max(
            r.get("spread") or 0.0
            for r in rows
            if r.get("path") in (UINT8, FLOAT) and r.get("images_per_s") is not None
        )
        summary["pipeline_uint8_vs_float"] = uint8_vs_float
    shares = [r["decode_share"] for r in rows if r.get("path") == IMAGES and r.get("decode_share") is not None]
    if shares:
        summary["pipeline_decode_share_min"] = min(shares)
    return summary


def _by_path(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per path and batch, the best concurrency's images/s and images/s per server core, and the rate at
    PIPELINE_CONCURRENCY (or the highest measured)."""
    table: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for path in [p.name for p in PATHS] + [GATEWAY]:
        for batch in sorted({r["batch"] for r in rows if r.get("path") == path}):
            measured = _at(rows, path, batch)
            if not measured:
                continue
            best = max(measured.values(), key=lambda r: r["images_per_s"])
            at = measured.get(PIPELINE_CONCURRENCY) or measured[max(measured)]
            entry = {
                "best_images_per_s": best["images_per_s"],
                "best_concurrency": best["concurrency"],
                "best_images_per_s_per_core": per_core(best),
                "images_per_s": at["images_per_s"],
                "images_per_s_per_core": per_core(at),
                "concurrency": at["concurrency"],
                "spread": at["spread"],
            }
            if at.get("decode_share") is not None:
                entry["decode_share"] = at["decode_share"]
            table.setdefault(path, {})[str(batch)] = entry
    return table


def line(summary: Dict[str, Any]) -> Optional[str]:
    """pipeline_vs_embedder and the per-core figure in words; None when the run did not measure them."""
    if "pipeline_vs_embedder" not in summary:
        return None
    text = (
        f"pipeline: pipeline_vs_embedder {summary['pipeline_vs_embedder']:.3f} (spread "
        f"{summary['pipeline_vs_embedder_spread'] or 0.0:.3f}) at batch 1, concurrency "
        f"{summary['pipeline_vs_embedder_concurrency']}; the public ensemble "
        f"{summary['pipeline_images_per_s_per_core']:.1f} images/s per server core "
        f"({summary['pipeline_server_cores']} cores)"
    )
    if "pipeline_uint8_vs_float_min" in summary:
        text += f"; uint8 over float at worst {summary['pipeline_uint8_vs_float_min']:.3f}"
    if "pipeline_decode_share_min" in summary:
        text += f"; image files: decoding {summary['pipeline_decode_share_min']:.0%} or more of the server time"
    return text
