"""Benchmark results -> JSON file, PNG plot, fixed-width text table.

`results` is the orchestrator's dict: {"machine": {...}, "settings": {...},
"rows": [...], "summary": {...}}. A row with a `concurrency` is one point of a
load-generator series (rows sharing a `name` form one line); a row without one
(the diffusers baseline, onnxruntime in-process) is a single number, drawn as
a horizontal reference line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]
Row = Mapping[str, object]

BASELINE_LABEL = "diffusers forward() (baseline)"
# Two columns of legend fit the figure's width with the rows' longest labels.
LEGEND_COLUMNS = 2


def _json_default(value: object) -> object:
    """numpy scalars and arrays sneak into results from measurements; write them as plain numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(results: Mapping[str, object], path: PathLike) -> Path:
    """Write `results` as indented JSON (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default, allow_nan=True) + "\n")
    return path


def _is_series(row: Row) -> bool:
    return row.get("concurrency") is not None


def _series(rows: Sequence[Row]) -> Dict[str, List[Row]]:
    """Load-generator rows grouped by name, in first-seen order, each sorted by concurrency."""
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        if _is_series(row):
            groups.setdefault(str(row["name"]), []).append(row)
    return {name: sorted(group, key=lambda r: r["concurrency"]) for name, group in groups.items()}


def _p95(row: Row) -> float:
    latency = row.get("latency_ms") or {}
    value = latency.get("p95") if isinstance(latency, Mapping) else None
    return float(value) if value is not None else math.nan


def _reference_label(row: Row, rows: Sequence[Row]) -> str:
    """The diffusers baseline gets one unmistakable label; other single-number rows their name."""
    if row.get("kind") == "baseline":
        baselines = [r for r in rows if r.get("kind") == "baseline"]
        return BASELINE_LABEL if len(baselines) == 1 else f"{row['name']} (baseline)"
    return str(row["name"])


# Line styles of the horizontal reference lines; the series are solid lines with markers.
BASELINE_DASHES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
REFERENCE_DASHES = ("--", "-.", ":")


def reference_styles(references: Sequence[Row], first_colour: int = 0) -> List[Dict[str, object]]:
    """A line style of its own for every reference row: the diffusers baselines black, told apart by their
    dashes; the others a colour each from `first_colour` on (after the series'), dashed. No two references
    share colour and dashes."""
    styles: List[Dict[str, object]] = []
    baselines, others = 0, first_colour
    for row in references:
        if row.get("kind") == "baseline":
            dashes = BASELINE_DASHES[baselines % len(BASELINE_DASHES)]
            styles.append({"color": "black", "linestyle": dashes, "linewidth": 1.5})
            baselines += 1
        else:
            dashes = REFERENCE_DASHES[(others // 10) % len(REFERENCE_DASHES)]
            styles.append({"color": f"C{others % 10}", "linestyle": dashes, "linewidth": 1.2})
            others += 1
    return styles


def _best_per_kind(rows: Sequence[Row]) -> List[Row]:
    """Each in-process kind's fastest batch, in first-seen order: one line per kind (the table has every batch)."""
    best: Dict[str, Row] = {}
    for row in rows:
        kind = str(row.get("kind"))
        if kind not in best or float(row["images_per_s"]) > float(best[kind]["images_per_s"]):
            best[kind] = row
    return list(best.values())


def plot(results: Mapping[str, object], path: PathLike) -> Path:
    """Two panels, throughput and p95 latency against concurrency; returns the PNG's path.

    Each series is one line; a series with failed requests says so in its
    legend entry, so an erroneous run cannot pass for a good one.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on benchmark hosts
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    # The pipeline rows measure a tiny checker, hundreds of times faster: they have a table of their own.
    rows: List[Row] = [r for r in results.get("rows", []) if not str(r.get("kind", "")).startswith("pipeline")]
    series = _series(rows)
    # The decoder's rows (decoded images/s per instance, a hundred times the checker's rate) are in the table only.
    references = _best_per_kind(
        [
            row
            for row in rows
            if not _is_series(row) and row.get("images_per_s") is not None and row.get("kind") != "decoder"
        ]
    )
    concurrencies = sorted({int(r["concurrency"]) for group in series.values() for r in group}) or [1]

    fig, (throughput_ax, latency_ax) = plt.subplots(1, 2, figsize=(13, 5.5))
    colour = 0
    for name, group in series.items():
        x = [int(r["concurrency"]) for r in group]
        errors = sum(int(r.get("errors") or 0) for r in group)
        label = name if not errors else f"{name} [failed requests: {errors}]"
        style = {"color": f"C{colour % 10}", "marker": "o", "label": label}
        throughput_ax.plot(x, [float(r["images_per_s"]) for r in group], **style)
        latency_ax.plot(x, [_p95(r) for r in group], **style)
        colour += 1
    for row, style in zip(references, reference_styles(references, first_colour=len(series))):
        style = {**style, "label": _reference_label(row, rows)}
        throughput_ax.axhline(float(row["images_per_s"]), **style)
        p95 = _p95(row)
        if not math.isnan(p95):
            latency_ax.axhline(p95, **style)

    for ax, ylabel in ((throughput_ax, "throughput (images/s)"), (latency_ax, "p95 latency per request (ms)")):
        if len(concurrencies) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies)
        ax.set_xticklabels([str(c) for c in concurrencies])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrency (outstanding requests)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    throughput_ax.set_title("throughput")
    latency_ax.set_title("p95 latency")
    handles, labels = throughput_ax.get_legend_handles_labels()
    columns = min(LEGEND_COLUMNS, max(1, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=False)

    machine = results.get("machine") or {}
    description = machine.get("description", "") if isinstance(machine, Mapping) else ""
    fig.suptitle("Stable Diffusion safety checker" + (f"\n{description}" if description else ""))
    legend_rows = math.ceil(len(labels) / columns) if labels else 0
    fig.tight_layout(rect=(0, 0.04 + 0.045 * legend_rows, 1, 1))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def _number(value: object, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def _server_summary(row: Row) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(avg batch size, avg queue ms, avg compute ms) of the first model in `server` that has them."""
    server = row.get("server") or {}
    for stats in server.values() if isinstance(server, Mapping) else ():
        values = (stats.get("avg_batch_size"), stats.get("avg_queue_ms"), stats.get("avg_compute_infer_ms"))
        if all(v is not None for v in values):
            return values
    return None, None, None


def table(results: Mapping[str, object]) -> str:
    """Every row as one line of a fixed-width table ("-" where a row has no such number)."""
    headers = (
        "name",
        "conc",
        "batch",
        "images/s",
        "spread %",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "srv batch",
        "queue ms",
        "compute ms",
        "errors",
    )
    lines: List[Tuple[str, ...]] = []
    for row in results.get("rows", []):
        latency = row.get("latency_ms") or {}
        batch_size, queue_ms, compute_ms = _server_summary(row)
        lines.append(
            (
                str(row.get("name", "?")),
                str(row["concurrency"]) if _is_series(row) else "-",
                str(row.get("batch", "-")),
                _number(row.get("images_per_s"), 2),
                _number(100 * row["spread"] if row.get("spread") is not None else None, 1),
                *(_number(latency.get(p), 1) for p in ("p50", "p95", "p99")),
                _number(batch_size, 2),
                _number(queue_ms, 1),
                _number(compute_ms, 1),
                str(row["errors"]) if row.get("errors") is not None else "-",
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]

    def render(cells: Sequence[str]) -> str:
        # Names left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([render(headers), "  ".join("-" * w for w in widths)] + [render(line) for line in lines])
