"""The summary: the headline numbers and ratios of a run, the last line `python -m bench` prints.

Each section reads the rows it divides and adds its keys only when those rows
were measured, so a run of a few rows (`--rows`) reports the ratios they allow
and omits the rest; a full run holds every key.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from bench import pipeline
from bench.settings import GATEWAY_CONCURRENCY

Row = Dict[str, Any]


class Rows:
    """The pooled rows of a run, looked up by kind (rows without a rate are left out)."""

    def __init__(self, rows: List[Row]) -> None:
        self.rows = rows

    def of(self, kind: str) -> List[Row]:
        return [r for r in self.rows if r["kind"] == kind and r["images_per_s"] is not None]

    def best(self, kind: str) -> Optional[Row]:
        return max(self.of(kind), key=lambda r: r["images_per_s"]) if self.of(kind) else None


def reference_batch(concurrency: int, best_batch: int, measured: Sequence[int]) -> int:
    """The in-process batch a server at `concurrency` is held to: min(concurrency, best batch), since c clients
    one image each can form no larger batch (issue 22); the largest measured batch up to that, if it was not."""
    wanted = min(concurrency, best_batch)
    return max((b for b in measured if b <= wanted), default=min(measured))


def _ratios(served_rows: List[Row], references: List[Row]) -> Dict[str, Any]:
    """Served over in-process at reference_batch, per concurrency and at worst; the worst of each round on its own
    (the rounds are repeated runs: how far apart their minima lie says how far the ratio can be trusted); and the
    spread: the largest of the rows' own."""
    best = max(references, key=lambda r: r["images_per_s"])
    by_batch = {r["batch"]: r for r in references}
    held_to = {
        r["concurrency"]: by_batch[reference_batch(r["concurrency"], best["batch"], list(by_batch))]
        for r in served_rows
    }
    by_concurrency = {
        str(r["concurrency"]): r["images_per_s"] / held_to[r["concurrency"]]["images_per_s"] for r in served_rows
    }
    used = [*served_rows, *{id(r): r for r in held_to.values()}.values()]
    rounds = min(len(r["windows_images_per_s"]) for r in used)
    by_round = [
        min(r["windows_images_per_s"][k] / held_to[r["concurrency"]]["windows_images_per_s"][k] for r in served_rows)
        for k in range(rounds)
    ]
    return {
        "by_concurrency": by_concurrency,
        "min": min(by_concurrency.values()),
        "min_at_concurrency": int(min(by_concurrency, key=by_concurrency.get)),
        "min_by_round": by_round,
        "reference_batch_by_concurrency": {str(c): r["batch"] for c, r in held_to.items()},
        "spread": max(r["spread"] or 0.0 for r in used),
    }


def _served_vs_in_process(key: str, rows: Rows, served_kind: str, reference_kind: str) -> Dict[str, Any]:
    """`key` (best served over best in-process) and its ratios per concurrency against reference_batch; empty
    without both rows."""
    served, reference = rows.best(served_kind), rows.best(reference_kind)
    if served is None or reference is None:
        return {}
    ratios = _ratios(rows.of(served_kind), rows.of(reference_kind))
    return {
        key: served["images_per_s"] / reference["images_per_s"],
        f"{key}_min": ratios["min"],
        f"{key}_min_at_concurrency": ratios["min_at_concurrency"],
        f"{key}_by_concurrency": ratios["by_concurrency"],
        f"{key}_min_by_round": ratios["min_by_round"],
        f"{key}_reference_batch_by_concurrency": ratios["reference_batch_by_concurrency"],
        f"{key}_spread": ratios["spread"],
    }


def _over(key: str, row: Optional[Row], reference: Optional[Row]) -> Dict[str, Any]:
    """{key: row's rate over the reference's, key_spread: the larger of the two rows' spreads}; empty without
    both."""
    if not (row and reference):
        return {}
    return {
        key: row["images_per_s"] / reference["images_per_s"],
        f"{key}_spread": max(row.get("spread") or 0.0, reference.get("spread") or 0.0),
    }


def _fp32(rows: Rows) -> Dict[str, Any]:
    diffusers, ort, triton = rows.best("baseline"), rows.best("ort"), rows.best("triton")
    summary: Dict[str, Any] = {}
    if diffusers:
        summary["diffusers_images_per_s"] = diffusers["images_per_s"]
    if ort:
        summary["ort_images_per_s"] = ort["images_per_s"]
        summary["ort_best_batch"] = ort["batch"]
    if triton:
        summary["triton_images_per_s"] = triton["images_per_s"]
        summary["triton_best_concurrency"] = triton["concurrency"]
    summary.update(_over("speedup_vs_diffusers", triton, diffusers))
    summary.update(_served_vs_in_process("triton_vs_ort", rows, "triton", "ort"))
    summary["unstable_perf_analyzer_windows"] = sum(r.get("unstable_windows", 0) for r in rows.rows)
    return summary


def _image_files(rows: Rows) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    encoded = rows.best("triton-images")
    if encoded:
        summary["images_encoded_per_s"] = encoded["images_per_s"]
        summary["encoded_best_concurrency"] = encoded["concurrency"]
    summary.update(_over("encoded_vs_pixels", encoded, rows.best("triton")))
    for row in rows.rows:
        if row["kind"] == "decoder":
            summary[f"decoded_{row['format'].lower()}_per_s_per_instance"] = row["images_per_s"]
    return summary


def _gateway(rows: Rows, goal: Optional[float]) -> Dict[str, Any]:
    """The gateway's best rate, and `gateway_vs_triton`: its images/s over Triton's own encoded path (the images
    row) at GATEWAY_CONCURRENCY, or at the highest concurrency both rows measured if they did not measure that;
    per concurrency and per round too, with the goal and what the gateway process spent per image."""
    summary: Dict[str, Any] = {}
    best = rows.best("gateway")
    if best:
        summary["gateway_images_per_s"] = best["images_per_s"]
        summary["gateway_best_concurrency"] = best["concurrency"]
    through = {r["concurrency"]: r for r in rows.of("gateway")}
    direct = {r["concurrency"]: r for r in rows.of("triton-images") if r["images_per_s"] > 0}
    shared = sorted(set(through) & set(direct))
    if not shared:
        return summary
    at = GATEWAY_CONCURRENCY if GATEWAY_CONCURRENCY in shared else shared[-1]
    windows = zip(through[at]["windows_images_per_s"], direct[at]["windows_images_per_s"])
    summary.update(
        {
            "gateway_vs_triton": through[at]["images_per_s"] / direct[at]["images_per_s"],
            "gateway_vs_triton_concurrency": at,
            "gateway_vs_triton_by_concurrency": {
                str(c): through[c]["images_per_s"] / direct[c]["images_per_s"] for c in shared
            },
            "gateway_vs_triton_by_round": [g / t if t else None for g, t in windows],
            "gateway_vs_triton_spread": max(through[at].get("spread") or 0.0, direct[at].get("spread") or 0.0),
        }
    )
    if goal is not None:
        summary["gateway_vs_triton_goal"] = goal
    summary["gateway_cpu_ms_per_image"] = through[at].get("gateway_cpu_ms_per_image")
    return summary


def _int8(rows: Rows) -> Dict[str, Any]:
    int8, ort_int8 = rows.best("triton-int8"), rows.best("ort-int8")
    summary: Dict[str, Any] = {}
    if int8:
        summary["triton_int8_images_per_s"] = int8["images_per_s"]
    if ort_int8:
        summary["ort_int8_images_per_s"] = ort_int8["images_per_s"]
    summary.update(_over("int8_speedup_vs_diffusers", int8, rows.best("baseline")))
    summary.update(_served_vs_in_process("triton_int8_vs_ort_int8", rows, "triton-int8", "ort-int8"))
    return summary


def _cascade(rows: Rows) -> Dict[str, Any]:
    cascade = rows.best("cascade")
    summary: Dict[str, Any] = {}
    if cascade:
        summary["cascade_images_per_s"] = cascade["images_per_s"]
        summary["cascade_fallback_fraction"] = cascade["fallback_fraction"]
    summary.update(_over("cascade_speedup_vs_diffusers", cascade, rows.best("baseline")))
    for row in rows.of("cascade-forced"):
        key = f"cascade_forced_{round(row['forced_fallback'] * 100)}pct"
        summary[f"{key}_images_per_s"] = row["images_per_s"]
        summary[f"{key}_fallback_fraction"] = row["fallback_fraction"]
    return summary


def _scan(rows: Rows, scan: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The scan against the served checker over the best fp32 row, and against the tiny checker over the best
    rate of the path it sends to (the float ensemble's pipeline rows); each ratio's spread is the larger of the
    scan's own (its two halves' rates) and the row's."""
    if not scan:
        return {}
    served_scan, ceiling = scan["served"], scan["ceiling"]
    tiny = [r for r in rows.of(pipeline.KIND) if r.get("path") == pipeline.FLOAT]
    return {
        "scan_images_per_s": served_scan["images_per_s"],
        **_over("scan_vs_server", served_scan, rows.best("triton")),
        "scan_ceiling_images_per_s": ceiling["images_per_s"],
        "scan_ceiling_images_per_client_core_s": ceiling["images_per_client_cpu_s"],
        **_over("scan_tiny_vs_server", ceiling, max(tiny, key=lambda r: r["images_per_s"]) if tiny else None),
    }


def summarize(
    rows: List[Row],
    scan: Optional[Dict[str, Any]] = None,
    cpu_flags: Sequence[str] = (),
    gateway_goal: Optional[float] = None,
) -> Dict[str, Any]:
    """Every ratio the measured rows allow, in a fixed order; `gateway_goal`: the run's goal for gateway_vs_triton."""
    table = Rows(rows)
    return {
        **_fp32(table),
        **_image_files(table),
        **_gateway(table, gateway_goal),
        **_int8(table),
        **_cascade(table),
        **pipeline.summarize(rows),
        "cpu_flags": list(cpu_flags),
        **_scan(table, scan),
    }


def scan_line(scan: Dict[str, Any], summary: Dict[str, Any]) -> str:
    """What the scan runs measured, in words."""
    served, ceiling = scan["served"], scan["ceiling"]
    against = (
        f" ({summary['scan_vs_server']:.2f} of perf_analyzer's best fp32 row)" if "scan_vs_server" in summary else ""
    )
    return (
        f"scan: {served['images']} real-size files at {served['images_per_s']:.2f} images/s against the served "
        f"checker{against}; against a tiny checker "
        f"{ceiling['images_per_s']:.1f} images/s, {ceiling['images_per_client_cpu_s']:.1f} images/s per client core"
    )


def gateway_line(summary: Dict[str, Any]) -> Optional[str]:
    """gateway_vs_triton in words, with its goal; None when the run did not measure it."""
    if "gateway_vs_triton" not in summary:
        return None
    ratio, goal = summary["gateway_vs_triton"], summary.get("gateway_vs_triton_goal")
    verdict = f" (goal >= {goal:g}: {'met' if ratio >= goal else 'missed'})" if goal is not None else ""
    cpu = summary.get("gateway_cpu_ms_per_image")
    spent = f"; the gateway process spent {cpu:.1f} ms of CPU per image" if cpu is not None else ""
    return (
        f"gateway: gateway_vs_triton {ratio:.3f} at concurrency {summary['gateway_vs_triton_concurrency']}"
        f"{verdict}: the seed's route over Triton's own encoded path, the same files{spent}"
    )
