"""`python -m bench.figures`: the figures of docs/benchmarks.md, written from the committed results of one run.

No figure in the docs is typed by hand: `make bench-docs` copies a run's
results.json and perf_analyzer.csv from bench-results/ into docs/ (`--from`),
draws docs/benchmarks-throughput.png from those results, and rewrites the part
of docs/benchmarks.md between the two markers below from
docs/benchmarks-results.json. `--check` rewrites nothing and fails when the
page does not say what the committed results hold (the tests run it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from bench import report

BEGIN = "<!-- figures: begin (written by `python -m bench.figures` from benchmarks-results.json; do not edit) -->"
END = "<!-- figures: end -->"
DOCS = Path(__file__).resolve().parent.parent / "docs"
# What --from copies out of a run's output folder, and the names the docs know them by.
COPIED = {"results.json": "benchmarks-results.json", "perf_analyzer.csv": "benchmarks-perf_analyzer.csv"}
PLOT = "benchmarks-throughput.png"

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Goal:
    key: str
    goal: float
    what: str
    needs_flag: Optional[str] = None  # the goal holds on a CPU with this flag only


GOALS = (
    Goal("triton_vs_ort_min", 0.95, "served fp32 over in-process at batch min(c, best batch), worst concurrency"),
    Goal("triton_int8_vs_ort_int8_min", 0.95, "the same for int8"),
    Goal("pipeline_vs_embedder", 0.9, "tiny checker: the public ensemble over the embedder alone, batch 1"),
    Goal("pipeline_uint8_vs_float_min", 1.0, "tiny checker: the uint8 ensemble over the float one, worst point"),
    Goal("scan_vs_server", 0.95, "`safety-checker scan`, default options, over the best served fp32 row"),
    Goal("scan_tiny_vs_server", 0.95, "the same against the tiny checker, over its float ensemble's best row"),
    Goal("gateway_vs_triton", 0.95, "the seed's route through the gateway over Triton's own encoded path"),
    Goal("cascade_speedup_vs_diffusers", 2.5, "the cascade over diffusers at its best batch", "avx512_vnni"),
)
# The keys of the summary line the docs show (with their spreads where the summary has one).
HEADLINE = (
    "diffusers_images_per_s",
    "ort_images_per_s",
    "ort_best_batch",
    "triton_images_per_s",
    "speedup_vs_diffusers",
    "triton_vs_ort_min",
    "ort_int8_images_per_s",
    "triton_int8_images_per_s",
    "int8_speedup_vs_diffusers",
    "triton_int8_vs_ort_int8_min",
    "cascade_images_per_s",
    "cascade_speedup_vs_diffusers",
    "images_encoded_per_s",
    "encoded_vs_pixels",
    "gateway_vs_triton",
    "pipeline_vs_embedder",
    "pipeline_images_per_s_per_core",
    "pipeline_uint8_vs_float_min",
    "pipeline_decode_share_min",
    "scan_images_per_s",
    "scan_vs_server",
    "scan_tiny_vs_server",
    "unstable_perf_analyzer_windows",
)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.1f}"


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def verdict(goal: Goal, summary: Mapping[str, Any], flags: Sequence[str]) -> str:
    """met, missed, or missed within the spread (the goal lies within value * (1 + spread)); not applicable where
    the goal is for CPUs with a flag this one lacks."""
    value = summary.get(goal.key)
    if value is None:
        return "not measured"
    if goal.needs_flag and goal.needs_flag not in flags:
        return f"not applicable: the goal is for CPUs with {goal.needs_flag}"
    if value >= goal.goal:
        return "met"
    spread = _spread(summary, goal.key) or 0.0
    return "missed, within the spread" if value * (1 + spread) >= goal.goal else "missed"


def _spread(summary: Mapping[str, Any], key: str) -> Optional[float]:
    """A figure's spread: `key_spread`, or for a `_min` figure its ratio's (`triton_vs_ort_spread`)."""
    own = summary.get(f"{key}_spread")
    return own if own is not None or not key.endswith("_min") else summary.get(f"{key[: -len('_min')]}_spread")


def _by_round(summary: Mapping[str, Any], key: str) -> str:
    rounds = summary.get(f"{key}_min_by_round") or summary.get(f"{key}_by_round")
    return ", ".join(_number(r) for r in rounds) if rounds else "-"


def goals_table(summary: Mapping[str, Any], flags: Sequence[str]) -> List[str]:
    lines = [
        "| figure | what | value | spread | each round | goal | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for goal in GOALS:
        lines.append(
            f"| `{goal.key}` | {goal.what} | {_number(summary.get(goal.key))} | "
            f"{_percent(_spread(summary, goal.key))} | {_by_round(summary, goal.key)} | "
            f">= {goal.goal:g} | {verdict(goal, summary, flags)} |"
        )
    return lines


def _formed(row: Row) -> str:
    """The batch the dynamic batcher formed for the embedder (the int8 one in the cascade)."""
    server = row.get("server") or {}
    model = server.get("safety_checker_embedder_int8") or server.get("safety_checker_embedder") or {}
    return _number(model.get("avg_batch_size"), 2) if model.get("avg_batch_size") else "-"


def _latency(row: Row, percentile: str) -> str:
    value = (row.get("latency_ms") or {}).get(percentile)
    return "-" if value is None else f"{value:.0f}"


def rows_table(rows: Sequence[Row]) -> List[str]:
    """Every row but the pipeline's (their own table): one line per row, in the run's order."""
    lines = [
        "| row | concurrency | batch | images/s | spread | p50 ms | p95 ms | batch formed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["kind"].startswith("pipeline"):
            continue
        concurrency = row.get("concurrency")
        lines.append(
            f"| {row['name']} | {concurrency if concurrency is not None else '-'} | {row.get('batch') or '-'} | "
            f"{_number(row.get('images_per_s'))} | {_percent(row.get('spread'))} | {_latency(row, 'p50')} | "
            f"{_latency(row, 'p95')} | {_formed(row)} |"
        )
    return lines


def pipeline_table(rows: Sequence[Row]) -> List[str]:
    """The pipeline rows: per path and request batch, images/s at each concurrency, per core at the best one."""
    measured = [r for r in rows if r["kind"].startswith("pipeline") and r.get("images_per_s") is not None]
    if not measured:
        return []
    levels = sorted({r["concurrency"] for r in measured})
    header = " | ".join(f"c={c} images/s" for c in levels)
    lines = [
        f"| path | batch | {header} | best per server core | spread at best | decode share at best |",
        "| --- | --- | " + " | ".join("---" for _ in levels) + " | --- | --- | --- |",
    ]
    groups: Dict[tuple, Dict[int, Row]] = {}
    for row in measured:
        groups.setdefault((row["path"], row["batch"]), {})[row["concurrency"]] = row
    for (path, batch), by_concurrency in groups.items():
        best = max(by_concurrency.values(), key=lambda r: r["images_per_s"])
        rates = " | ".join(
            _number(by_concurrency[c]["images_per_s"], 1) if c in by_concurrency else "-" for c in levels
        )
        lines.append(
            f"| {path} | {batch} | {rates} | {_number(best.get('images_per_s_per_core'), 1)} "
            f"(c={best['concurrency']}) | "
            f"{_percent(best.get('spread'))} | {_percent(best.get('decode_share'))} |"
        )
    return lines


def _scan_lines(scan: Optional[Mapping[str, Any]]) -> List[str]:
    if not scan:
        return []
    lines = []
    for label, run in (("the served fp32 checker", scan["served"]), ("the tiny checker", scan["ceiling"])):
        halves = ", ".join(_number(h, 2) for h in run.get("halves_images_per_s") or []) or "-"
        lines.append(
            f"- against {label}: {run['images']} real-size files at {_number(run['images_per_s'], 2)} images/s "
            f"(halves of the run: {halves}), {_number(run.get('images_per_client_cpu_s'), 1)} images per second of "
            "client CPU time"
        )
    return lines


def _int8_lines(report: Optional[Mapping[str, Any]]) -> List[str]:
    if not report:
        return []
    stress, random = report.get("stress_margins", {}), report.get("random_inputs", {})
    return [
        f"- int8 report ({report.get('weights')}): largest cosine deviation "
        f"{_number(report.get('max_cosine_deviation'), 4)}, cascade bound {_number(report.get('cosine_bound'), 4)}; "
        f"on {random.get('images')} random inputs decision agreement "
        f"{_percent(random.get('decision_agreement'))}; at the stress margins "
        f"{_percent(stress.get('decision_agreement'))} of {stress.get('cases')} decisions agree with fp32"
    ]


def headline(summary: Mapping[str, Any]) -> str:
    """The summary line's headline keys and their spreads, rounded to three decimals."""
    picked: Dict[str, Any] = {}
    for key in HEADLINE:
        for name in (key, f"{key}_spread"):
            if name in summary:
                value = summary[name]
                picked[name] = round(value, 3) if isinstance(value, float) else value
    return json.dumps(picked)


def render(results: Mapping[str, Any]) -> str:
    """The generated part of docs/benchmarks.md, markers included."""
    machine, settings, summary = results["machine"], results["settings"], results["summary"]
    load = machine.get("load_average") or {}
    flags = list(machine.get("cpu_flags", []))
    intro = (
        f"`make bench` ended {results.get('date', 'on an unrecorded date')}, on {machine['description']}; CPU flags "
        f"`{' '.join(flags) or 'none of interest'}`; Python {machine['python']}, torch {machine['torch']}, "
        f"onnxruntime {machine['onnxruntime']}, Triton {machine['triton']}. Model: {settings['model']}. "
        f"{settings['rounds']} interleaved rounds, {settings['window_s']:g} s in-process and load-generator windows, "
        f"{settings['duration_s'] / 60:.0f} minutes in all; the 1-minute load average was "
        f"{_number(load.get('start'), 2)} at the start and {_number(load.get('end'), 2)} at the end. Spread: "
        "(max - min) / mean of a row's windows; of a ratio, the largest spread of the rows it divides."
    )
    parts = [BEGIN, "", intro, "", "Goals (issue 22 and the issues before it):", "", *goals_table(summary, flags), ""]
    parts += ["Every row but the pipeline's:", "", *rows_table(results["rows"]), ""]
    pipeline = pipeline_table(results["rows"])
    if pipeline:
        parts += ["The pipeline rows (tiny checker; batch: images per request):", "", *pipeline, ""]
    details = _scan_lines(results.get("scan")) + _int8_lines(results.get("int8_report"))
    if details:
        parts += [*details, ""]
    parts += ["The summary's headline keys:", "", "```json", headline(summary), "```", "", END]
    return "\n".join(parts)


def rewrite(document: str, rendered: str) -> str:
    """`document` with the part between the markers replaced by `rendered`."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {BEGIN!r} ... {END!r} part to rewrite")
    return document[:start] + rendered + document[end + len(END) :]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.figures", description=__doc__)
    parser.add_argument("--from", dest="source", type=Path, help="a run's output folder to copy into the docs first")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: this checkout's docs/)")
    parser.add_argument("--check", action="store_true", help="fail if the docs differ from the results; write nothing")
    args = parser.parse_args(argv)
    if args.source and args.check:
        parser.error("--check compares the committed results; it copies nothing (drop --from)")
    if args.source:
        for name in COPIED:
            if not (args.source / name).exists():
                parser.error(f"{args.source / name} does not exist: run make bench first")
        for name, target in COPIED.items():
            shutil.copyfile(args.source / name, args.docs / target)
    results = json.loads((args.docs / COPIED["results.json"]).read_text())
    if args.source:
        report.plot(results, args.docs / PLOT)
    page = args.docs / "benchmarks.md"
    current = page.read_text()
    written = rewrite(current, render(results))
    if args.check:
        if written != current:
            print(
                f"{page} does not say what {COPIED['results.json']} holds: run python -m bench.figures", file=sys.stderr
            )
            return 1
        return 0
    page.write_text(written)
    print(f"{page}: figures of the run of {results.get('date', 'an unrecorded date')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
