"""`python -m bench`: build, export and serve the checker, then measure every candidate side by side.

Candidates are interleaved window by window (round 1: every candidate once,
round 2: again, ...), so a slow drift of the machine (thermal, another job)
lands on all of them alike; each row pools its windows and reports their
spread. The served pixel rows (fp32, int8, the cascade) are measured by
NVIDIA's perf_analyzer, one run per window (served.py), and its CSV is kept
beside results.json. The image-file rows keep the in-house load generator
(loadgen.py): it sends the files, each of its own size, as raw bytes the way
the client does, each client going through them in turn; and the same files,
base64 in the seed's JSON, through `safety-checker gateway` (gateway.py), for
gateway_vs_triton. The pipeline rows (pipeline.py) measure the serving
pipeline's own ceiling on a tiny checker: the embedder alone, each ensemble
and the gateway, per server core. The last line on
stdout is one JSON object with the headline numbers. `--rows` measures a
subset of the rows, and its summary holds the ratios they allow.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench import perf, pipeline, report, served
from bench import scan as scan_bench
from bench import selection as row_selection
from bench.candidates import PERF_KINDS, Candidate, candidates
from bench.harness import Harness, harness
from bench.machine import machine
from bench.pooling import pooled_row
from bench.selection import Selection
from bench.settings import CASCADE_IMAGES, CEILING_IMAGES, FORCED_FALLBACKS, FULL, QUICK, Settings
from bench.summary import gateway_line, scan_line, summarize

Say = Callable[[str], None]


def _levels(text: str) -> Tuple[int, ...]:
    """`1,4,8` -> (1, 4, 8): positive integers, in the order given."""
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return levels


def _rows(text: str) -> Selection:
    try:
        return row_selection.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model and 1 s windows: tests the harness")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results"),
        help="folder for results.json, perf_analyzer.csv, throughput.png and logs (default bench-results)",
    )
    parser.add_argument("--window", type=float, help="seconds per in-process and load-generator window")
    parser.add_argument("--rounds", type=int, help="interleaved rounds over all candidates")
    parser.add_argument(
        "--rows",
        type=_rows,
        default=row_selection.ALL,
        metavar="NAME,...",
        help=f"the rows to measure (default all): {row_selection.describe()}",
    )
    levels = (
        ("--concurrency", "concurrency", "concurrency levels of the served fp32 and int8 pixel rows"),
        ("--images-concurrency", "images_concurrency", "concurrency levels of the image-file rows and the gateway row"),
        ("--cascade-concurrency", "cascade_concurrency", "concurrency levels of the cascade rows"),
        ("--batches", "batches", "batch sizes of the in-process rows"),
    )
    for option, field, what in levels:
        parser.add_argument(option, dest=field, type=_levels, metavar="N,...", help=f"{what}, e.g. 1,4,8")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """--quick's or the full run's settings, with the options given on the command line."""
    base = QUICK if args.quick else FULL
    overrides = {
        name: getattr(args, name)
        for name in ("concurrency", "images_concurrency", "cascade_concurrency", "batches")
        if getattr(args, name) is not None
    }
    return dataclasses.replace(
        base, window_s=args.window or base.window_s, rounds=args.rounds or base.rounds, **overrides
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm import tqdm

    args = _parser().parse_args(argv)
    settings, selection = settings_from(args), args.rows
    output = args.output.resolve()
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (output / "perf_analyzer").mkdir(exist_ok=True)
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    say = lambda message: tqdm.write(message, file=sys.stderr)
    if selection.kinds & set(PERF_KINDS):
        perf.binary()  # no perf_analyzer, no benchmark: say so before the exports

    with tempfile.TemporaryDirectory(prefix="safety-checker-bench-") as scratch_dir:
        with harness(selection, args.quick, Path(scratch_dir), logs, say, settings.cascade_concurrency) as built:
            measured = candidates(settings, selection, built, output)
            _measure(settings, measured)
            scan = _scan(settings, built, measured, logs, say) if "scan" in selection else None

    rows = [pooled_row(candidate) for candidate in measured]
    results = _results(args, settings, selection, built, rows, scan, time.monotonic() - started)
    # Whether something else ran beside the benchmark: the 1-minute load average before and after it.
    results["machine"]["load_average"] = {"start": load_at_start, "end": os.getloadavg()[0]}
    csv_file = _keep_csv(measured, output)
    report.write_json(results, output / "results.json")
    report.plot(results, output / "throughput.png")
    print(report.table(results))
    if scan:
        print(scan_line(scan, results["summary"]))
    for said in (gateway_line(results["summary"]), pipeline.line(results["summary"])):
        if said:
            print(said)
    print(f"results: {output / 'results.json'}, perf_analyzer: {csv_file}, plot: {output / 'throughput.png'}")
    print(json.dumps(results["summary"]))
    return 0


def _measure(settings: Settings, measured: List[Candidate]) -> None:
    """Every candidate's windows, interleaved: round 1 measures each once, then round 2, ..."""
    from tqdm import tqdm

    bar = tqdm(total=settings.rounds * len(measured), unit="window", file=sys.stderr)
    for round_index in range(settings.rounds):
        for candidate in measured:
            bar.set_description(f"round {round_index + 1}/{settings.rounds}: {candidate.label}")
            window = candidate.window(settings.window_s, round_index + 1)
            candidate.windows.append({**window, "round": round_index + 1})
            bar.update()
    bar.close()


def _keep_csv(measured: List[Candidate], output: Path) -> Path:
    perf_windows = [(w, c.label) for c in measured if c.kind in PERF_KINDS for w in c.windows]
    return served.keep_csv(
        [w for w, _ in perf_windows], [label for _, label in perf_windows], output / "perf_analyzer.csv"
    )


def _results(
    args: argparse.Namespace,
    settings: Settings,
    selection: Selection,
    built: Harness,
    rows: List[Dict[str, Any]],
    scan: Optional[Dict[str, Any]],
    duration_s: float,
) -> Dict[str, Any]:
    """results.json: the machine, the settings, every row, the scan and the summary."""
    computer = machine()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # when it ended
        "machine": computer,
        "settings": {
            **dataclasses.asdict(settings),
            "interleaved": True,
            "forced_fallbacks": FORCED_FALLBACKS,
            "cascade_images": CASCADE_IMAGES,
            "duration_s": round(duration_s, 1),
            "model": "tiny (--quick)" if args.quick else "full-size ViT-L/14, random weights",
            "rows": sorted(selection.names),
        },
        "int8_report": built.int8_report,
        "cascade_bounds": built.forced,
        "rows": rows,
        "scan": scan,
        "summary": summarize(rows, scan, computer["cpu_flags"], settings.gateway_goal),
    }


def _scan(settings: Settings, built: Harness, measured: List[Candidate], logs: Path, say: Say) -> Dict[str, Any]:
    """`safety-checker scan` over real-size files: against the served checker, then against a tiny one."""
    triton = [pooled_row(c)["images_per_s"] or 0.0 for c in measured if c.kind == "triton"]
    best = max(triton) if triton else None  # the served fp32 rate sizes the scan; without it, the fewest files
    low, high = settings.scan_files
    count = int(min(max(round((best or 0.0) * settings.scan_work_s), low), high))
    quick = "tiny" not in built.servers
    ceiling_count = CEILING_IMAGES["quick" if quick else "full"]
    scratch = built.scratch
    folder = scan_bench.write_folder(scratch / "scan-images", max(count, ceiling_count))
    files = sorted(folder.iterdir())
    served_folder, ceiling_folder = scratch / "scan-served", scratch / "scan-ceiling"
    for target, number in ((served_folder, count), (ceiling_folder, ceiling_count)):
        target.mkdir()
        for source in files[:number]:
            os.link(source, target / source.name)
    say(f"safety-checker scan: {count} real-size files against the served checker")
    served_run = scan_bench.run_scan(built.servers["fp32"].grpc_url, served_folder, logs / "scan-served.log")
    say(f"safety-checker scan: {ceiling_count} real-size files against a tiny checker (the client's ceiling)")
    ceiling = scan_bench.run_scan(
        built.servers["tiny" if not quick else "fp32"].grpc_url, ceiling_folder, logs / "scan-ceiling.log"
    )
    return {"served": served_run, "ceiling": ceiling, "best_served_images_per_s": best}
