"""`python -m bench`: build, export and serve the checker, then measure every candidate side by side.

Candidates are interleaved window by window (round 1: every candidate once,
round 2: again, ...), so a slow drift of the machine (thermal, another job)
lands on all of them alike; each row pools its windows and reports their
spread. The served pixel rows (fp32, int8, the cascade) are measured by
NVIDIA's perf_analyzer, one run per window (served.py), and its CSV is kept
beside results.json. The image-file rows keep the in-house load generator
(loadgen.py): it sends the files, each of its own size, as raw bytes the way
the client does, each client going through them in turn. The last line on
stdout is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from bench import cascade, perf, perf_data, report, served
from bench import scan as scan_bench
from bench.loadgen import LoadResult, measure
from bench.served import PerfSettings
from export.quantize import REPORT_FILENAME
from fixtures.checkers import build_checker, save_checker
from fixtures.photos import PHOTOS, photo, photo_file
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_client import spec
from safety_checker_client.preprocess import preprocess

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    window_s: float  # in-process and load-generator windows
    rounds: int
    warmup_s: float
    concurrency: Sequence[int]  # the served fp32 and int8 pixel rows (perf_analyzer)
    images_concurrency: Sequence[int]  # the image-file rows (load generator)
    cascade_concurrency: Sequence[int]  # the cascade, as exported and at each forced fallback
    batches: Sequence[int]  # for the in-process candidates
    perf: PerfSettings


FULL = Settings(
    window_s=15.0,
    rounds=2,
    warmup_s=3.0,
    concurrency=tuple(range(1, 9)),
    images_concurrency=(1, 4, 8),
    cascade_concurrency=(8,),
    batches=(1, 4),
    perf=PerfSettings(min_requests=16, requests_per_client=4, stability_percentage=10, max_trials=6),
)
QUICK = Settings(
    window_s=1.0,
    rounds=2,
    warmup_s=0.3,
    concurrency=(1, 2),
    images_concurrency=(1, 2),
    cascade_concurrency=(2,),
    batches=(1,),
    perf=PerfSettings(min_requests=20, requests_per_client=5, stability_percentage=10, max_trials=4),
)
# Fallback fractions the cascade is measured at, besides its own; of CASCADE_IMAGES images.
FORCED_FALLBACKS = (0.05, 0.20)
CASCADE_IMAGES = 20


@dataclass
class Candidate:
    """One row of the table: something measured for one window at a time."""

    name: str
    kind: str  # baseline | ort | ort-int8 | decoder | triton | triton-int8 | triton-images | cascade | cascade-forced
    window: Callable[[float, int], Dict[str, Any]]  # (window_s, round) -> what the window measured
    extra: Dict[str, Any] = field(default_factory=dict)
    windows: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        where = self.extra.get("concurrency")
        return f"{self.name} c={where}" if where else self.name


class Worker:
    """A `bench.worker` process holding one in-process candidate."""

    def __init__(self, kind: str, model: Path, pixels_file: Path, log: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", kind, str(model), str(pixels_file)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
        )
        self._answer()

    def _answer(self) -> Dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.process.args[3]} died (see its log)")
        return json.loads(line)

    def window(self, batch: int, window_s: float) -> Dict[str, Any]:
        self.process.stdin.write(json.dumps({"batch": batch, "window_s": window_s}) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def machine() -> Dict[str, Any]:
    import onnxruntime
    import torch

    model = platform.processor()
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    present = set(flags.split(":", 1)[-1].split())
    simd = [name for name in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if name in present]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = f"{model}, {cores} cores ({', '.join(simd) or 'no AVX2'}), CPU only"
    return {
        "description": description,
        "cpu": model,
        "cores": cores,
        "simd": simd,
        # What int8 and fp32 matrix products can use: VNNI (avx512_vnni, avx_vnni) and AMX do int8 dot products.
        "cpu_flags": [name for name in CPU_FLAGS if name in present],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "triton": "2.51 (nvidia-pytriton 0.7.0)",
    }


def bench_pixels() -> np.ndarray:
    """Real photographs through the client's preprocessing: 8 images, the largest in-process batch."""
    images = [photo(name) for name in PHOTOS]
    return preprocess(images + [images[0][:, ::-1]])


# What safety_checker_images is fed: every photo as PNG and as JPEG, at its own size (300x451 to 1411x1411).
ENCODED_FORMATS = ("png", "jpeg")
# What the decoder alone decodes: a 512x512 photograph.
DECODER_PHOTO = "astronaut"


def encoded_requests() -> List[Dict[str, np.ndarray]]:
    """One request per file (batch 1), each client sending them in turn."""
    return [
        {spec.IMAGE.name: np.array([[photo_file(name, extension)]], dtype=object)}
        for name in PHOTOS
        for extension in ENCODED_FORMATS
    ]


def export(checkpoint: Path, repository: Path, log: Path, *extra: str) -> None:
    with log.open("w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "export", "--model", str(checkpoint), "--repository", str(repository), *extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        raise RuntimeError(f"export failed; see {log}:\n{log.read_text()[-2000:]}")


def cascade_images() -> List[np.ndarray]:
    """CASCADE_IMAGES real photographs for the cascade rows: each photo, then mirrored, then upside down."""
    images = [photo(name) for name in PHOTOS]
    return (images + [i[:, ::-1] for i in images] + [i[::-1] for i in images])[:CASCADE_IMAGES]


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
    )
    # Completions in the window, as perf_analyzer counts: with eight clients of about a second per request, a
    # 15 s window holds one or two whole cycles per client, and the cycles that fit are the short ones.
    rates = [r.completed_images_per_s for r in results]
    rate = pooled.completed_images_per_s
    return {
        **pooled.as_dict(),
        "images_per_s": rate,
        "windows_images_per_s": rates,
        "spread": served.spread(rates, rate),
    }


def _pooled_perf_row(candidate: Candidate) -> Dict[str, Any]:
    row = served.pooled(candidate.windows)
    cascade_model = candidate.extra.get("cascade_model")
    if cascade_model:  # images the fp32 embedder recomputed / images the cascade answered
        answered = row["server"][cascade_model]["inferences"]
        row["fallback_fraction"] = row["server"][spec.EMBEDDER_MODEL]["inferences"] / answered if answered else None
    return row


def pooled_row(candidate: Candidate) -> Dict[str, Any]:
    """One row of results.json from a candidate's windows."""
    if candidate.kind == "triton-images":
        pooled = _pooled_loadgen_row(candidate)
    elif candidate.kind in PERF_KINDS:
        pooled = _pooled_perf_row(candidate)
    else:
        pooled = _pooled_worker_row(candidate)
    return {"name": candidate.name, "kind": candidate.kind, **candidate.extra, **pooled}


def _ratios(served_rows: List[Dict[str, Any]], reference: Dict[str, Any]) -> Dict[str, Any]:
    """Served over in-process, per concurrency and at worst; and the worst of each round on its own (the rounds
    are repeated runs: how far apart their minima lie says how far the ratio can be trusted)."""
    by_concurrency = {str(r["concurrency"]): r["images_per_s"] / reference["images_per_s"] for r in served_rows}
    rounds = min(len(r["windows_images_per_s"]) for r in [*served_rows, reference])
    by_round = [
        min(r["windows_images_per_s"][k] for r in served_rows) / reference["windows_images_per_s"][k]
        for k in range(rounds)
    ]
    return {
        "by_concurrency": by_concurrency,
        "min": min(by_concurrency.values()),
        "min_at_concurrency": int(min(by_concurrency, key=by_concurrency.get)),
        "min_by_round": by_round,
        "spread": max(r["spread"] for r in [*served_rows, reference]),
    }


def summarize(
    rows: List[Dict[str, Any]], scan: Optional[Dict[str, Any]] = None, cpu_flags: Sequence[str] = ()
) -> Dict[str, Any]:
    def of(kind: str) -> List[Dict[str, Any]]:
        return [r for r in rows if r["kind"] == kind and r["images_per_s"] is not None]

    def best(kind: str) -> Optional[Dict[str, Any]]:
        return max(of(kind), key=lambda r: r["images_per_s"]) if of(kind) else None

    diffusers, ort, triton = best("baseline"), best("ort"), best("triton")
    fp32 = _ratios(of("triton"), ort)
    summary: Dict[str, Any] = {
        "diffusers_images_per_s": diffusers["images_per_s"],
        "ort_images_per_s": ort["images_per_s"],
        "ort_best_batch": ort["batch"],
        "triton_images_per_s": triton["images_per_s"],
        "triton_best_concurrency": triton["concurrency"],
        "speedup_vs_diffusers": triton["images_per_s"] / diffusers["images_per_s"],
        "triton_vs_ort": triton["images_per_s"] / ort["images_per_s"],
        "triton_vs_ort_min": fp32["min"],
        "triton_vs_ort_min_at_concurrency": fp32["min_at_concurrency"],
        "triton_vs_ort_by_concurrency": fp32["by_concurrency"],
        "triton_vs_ort_min_by_round": fp32["min_by_round"],
        "triton_vs_ort_spread": fp32["spread"],
        "unstable_perf_analyzer_windows": sum(r.get("unstable_windows", 0) for r in rows),
    }
    encoded = best("triton-images")
    if encoded is not None:
        summary["images_encoded_per_s"] = encoded["images_per_s"]
        summary["encoded_best_concurrency"] = encoded["concurrency"]
        summary["encoded_vs_pixels"] = encoded["images_per_s"] / triton["images_per_s"]
    for row in rows:
        if row["kind"] == "decoder":
            summary[f"decoded_{row['format'].lower()}_per_s_per_instance"] = row["images_per_s"]
    int8, ort_int8 = best("triton-int8"), best("ort-int8")
    if int8 is not None and ort_int8 is not None:
        ratios = _ratios(of("triton-int8"), ort_int8)
        summary["triton_int8_images_per_s"] = int8["images_per_s"]
        summary["ort_int8_images_per_s"] = ort_int8["images_per_s"]
        summary["int8_speedup_vs_diffusers"] = int8["images_per_s"] / diffusers["images_per_s"]
        summary["triton_int8_vs_ort_int8"] = int8["images_per_s"] / ort_int8["images_per_s"]
        summary["triton_int8_vs_ort_int8_min"] = ratios["min"]
        summary["triton_int8_vs_ort_int8_min_at_concurrency"] = ratios["min_at_concurrency"]
        summary["triton_int8_vs_ort_int8_by_concurrency"] = ratios["by_concurrency"]
        summary["triton_int8_vs_ort_int8_min_by_round"] = ratios["min_by_round"]
        summary["triton_int8_vs_ort_int8_spread"] = ratios["spread"]
    cascade_row = best("cascade")
    if cascade_row is not None:
        summary["cascade_images_per_s"] = cascade_row["images_per_s"]
        summary["cascade_fallback_fraction"] = cascade_row["fallback_fraction"]
        summary["cascade_speedup_vs_diffusers"] = cascade_row["images_per_s"] / diffusers["images_per_s"]
        for row in of("cascade-forced"):
            key = f"cascade_forced_{round(row['forced_fallback'] * 100)}pct"
            summary[f"{key}_images_per_s"] = row["images_per_s"]
            summary[f"{key}_fallback_fraction"] = row["fallback_fraction"]
        summary["cpu_flags"] = list(cpu_flags)
    if scan:
        served_scan, ceiling = scan["served"], scan["ceiling"]
        summary["scan_images_per_s"] = served_scan["images_per_s"]
        summary["scan_vs_server"] = served_scan["images_per_s"] / triton["images_per_s"]
        summary["scan_ceiling_images_per_s"] = ceiling["images_per_s"]
        summary["scan_ceiling_images_per_client_core_s"] = ceiling["images_per_client_cpu_s"]
    return summary


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm import tqdm

    args = _parser().parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = dataclasses.replace(base, window_s=args.window or base.window_s, rounds=args.rounds or base.rounds)
    output = args.output.resolve()
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (output / "perf_analyzer").mkdir(exist_ok=True)
    started = time.monotonic()
    say = lambda message: tqdm.write(message, file=sys.stderr)
    perf.binary()  # no perf_analyzer, no benchmark: say so before the exports

    with tempfile.TemporaryDirectory(prefix="safety-checker-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        say(f"building the {'tiny' if args.quick else 'full-size (ViT-L/14)'} checker with random weights")
        save_checker(scratch / "checker", build_checker("tiny" if args.quick else "full"))
        say("exporting fp32, int8 and cascade model repositories with `python -m export`")
        export(scratch / "checker", scratch / "fp32", logs / "export-fp32.log")
        export(scratch / "checker", scratch / "int8", logs / "export-int8.log", "--int8")
        export(scratch / "checker", scratch / "cascade", logs / "export-cascade.log", "--cascade")
        names = ["fp32", "int8", "cascade"]
        if not args.quick:  # the client's ceiling needs a server that costs almost nothing: a tiny checker
            save_checker(scratch / "tiny-checker", build_checker("tiny"))
            export(scratch / "tiny-checker", scratch / "tiny", logs / "export-tiny.log")
            names.append("tiny")
        int8_report = json.loads((scratch / "int8" / spec.EMBEDDER_MODEL / "1" / REPORT_FILENAME).read_text())
        pixels = bench_pixels()
        np.save(scratch / "pixels.npy", pixels)
        cascade_photos = cascade_images()
        cascade_pixels = preprocess(cascade_photos)
        cascade_data = scratch / "cascade-images.json"
        cascade_data.write_text(perf_data.render(perf_data.input_data(spec.ENSEMBLE_MODEL, cascade_photos)))
        decoder_files = {}
        for extension in ENCODED_FORMATS:
            decoder_files[extension] = scratch / f"{DECODER_PHOTO}.{extension}"
            decoder_files[extension].write_bytes(photo_file(DECODER_PHOTO, extension))

        say(f"starting {len(names)} tritonservers ({', '.join(names)}) and the in-process workers")
        servers = {
            name: TritonServer(scratch / name, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
            for name in names
        }
        workers: List[Worker] = []
        try:
            # The int8 server's embedder is the cascade's int8 embedder (one quantisation of one checkpoint):
            # it finds the bounds of the forced-fallback copies before the cascade server starts.
            int8_onnx = scratch / "int8" / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME
            if not filecmp.cmp(int8_onnx, scratch / "cascade" / spec.INT8_EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME):
                raise RuntimeError("the int8 and cascade exports quantised the checkpoint differently")
            servers["int8"].start()
            forced = _add_forced_copies(servers["int8"].grpc_url, cascade_pixels, scratch / "cascade", say)
            for server in servers.values():
                if server is not servers["int8"]:
                    server.start()
            diffusers = Worker("diffusers", scratch / "checker", scratch / "pixels.npy", logs / "diffusers.log")
            ort_fp32 = Worker(
                "onnxruntime",
                scratch / "fp32" / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME,
                scratch / "pixels.npy",
                logs / "onnxruntime-fp32.log",
            )
            ort_int8 = Worker(
                "onnxruntime",
                scratch / "int8" / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME,
                scratch / "pixels.npy",
                logs / "onnxruntime-int8.log",
            )
            images_config = scratch / "fp32" / spec.IMAGES_MODEL / "configs" / "cpu.pbtxt"
            decoders = {
                extension: Worker("decoder", images_config, path, logs / f"decoder-{extension}.log")
                for extension, path in decoder_files.items()
            }
            workers = [diffusers, ort_fp32, ort_int8, *decoders.values()]
            candidates = _candidates(
                settings, servers, (diffusers, ort_fp32, ort_int8), decoders, pixels, cascade_data, forced, output
            )

            bar = tqdm(total=settings.rounds * len(candidates), unit="window", file=sys.stderr)
            for round_index in range(settings.rounds):
                for candidate in candidates:
                    bar.set_description(f"round {round_index + 1}/{settings.rounds}: {candidate.label}")
                    window = candidate.window(settings.window_s, round_index + 1)
                    candidate.windows.append({**window, "round": round_index + 1})
                    bar.update()
            bar.close()
            best = max(pooled_row(c)["images_per_s"] or 0.0 for c in candidates if c.kind == "triton")
            scan = _scan(settings, servers, best, scratch, logs, say)
        finally:
            for worker in workers:
                worker.close()
            for server in servers.values():
                server.stop()

    rows = [pooled_row(candidate) for candidate in candidates]
    perf_windows = [(w, c.label) for c in candidates if c.kind in PERF_KINDS for w in c.windows]
    csv_file = served.keep_csv(
        [w for w, _ in perf_windows], [label for _, label in perf_windows], output / "perf_analyzer.csv"
    )
    computer = machine()
    results = {
        "machine": computer,
        "settings": {
            **dataclasses.asdict(settings),
            "interleaved": True,
            "forced_fallbacks": FORCED_FALLBACKS,
            "cascade_images": CASCADE_IMAGES,
            "duration_s": round(time.monotonic() - started, 1),
            "model": "tiny (--quick)" if args.quick else "full-size ViT-L/14, random weights",
        },
        "int8_report": int8_report,
        "cascade_bounds": forced,
        "rows": rows,
        "scan": scan,
        "summary": summarize(rows, scan, computer["cpu_flags"]),
    }
    report.write_json(results, output / "results.json")
    report.plot(results, output / "throughput.png")
    print(report.table(results))
    print(scan_line(scan, results["summary"]))
    print(f"results: {output / 'results.json'}, perf_analyzer: {csv_file}, plot: {output / 'throughput.png'}")
    print(json.dumps(results["summary"]))
    return 0


def _add_forced_copies(url: str, pixels: np.ndarray, repository: Path, say: Callable[[str], None]) -> Dict[str, Any]:
    """The cascade under FORCED_FALLBACKS: a copy per fraction in `repository`, each with the bound that sends
    that fraction of the cascade's images to fp32 (bench/cascade.py)."""
    say(f"finding the bounds that force {', '.join(f'{f:.0%}' for f in FORCED_FALLBACKS)} of the cascade to fp32")
    critical = cascade.critical_bounds(url, spec.EMBEDDER_MODEL, pixels)
    copies = {}
    for fraction in FORCED_FALLBACKS:
        name = forced_model(fraction)
        bound = cascade.bound_for(critical, round(fraction * len(pixels)))
        cascade.add_copy(repository, name, bound)
        copies[name] = {"fraction": fraction, "cosine_bound": bound}
    return {"critical_bounds": critical.tolist(), "copies": copies}


def forced_model(fraction: float) -> str:
    return f"{spec.CASCADE_MODEL}_forced_{round(fraction * 100)}pct"


SCAN_IMAGES = (48, 4000)
# Images in the scan against a tiny checker (the client's ceiling).
CEILING_IMAGES = {"quick": 96, "full": 800}


def _scan(
    settings: Settings,
    servers: Dict[str, TritonServer],
    best: float,
    scratch: Path,
    logs: Path,
    say: Callable[[str], None],
) -> Dict[str, Any]:
    """`safety-checker scan` over real-size files: against the served checker, then against a tiny one."""
    low, high = SCAN_IMAGES
    count = int(min(max(round(best * settings.window_s * settings.rounds), low), high))
    quick = "tiny" not in servers
    ceiling_count = CEILING_IMAGES["quick" if quick else "full"]
    folder = scan_bench.write_folder(scratch / "scan-images", max(count, ceiling_count))
    files = sorted(folder.iterdir())
    served_folder, ceiling_folder = scratch / "scan-served", scratch / "scan-ceiling"
    for target, number in ((served_folder, count), (ceiling_folder, ceiling_count)):
        target.mkdir()
        for source in files[:number]:
            os.link(source, target / source.name)
    say(f"safety-checker scan: {count} real-size files against the served checker")
    served = scan_bench.run_scan(servers["fp32"].grpc_url, served_folder, logs / "scan-served.log")
    say(f"safety-checker scan: {ceiling_count} real-size files against a tiny checker (the client's ceiling)")
    ceiling = scan_bench.run_scan(
        servers["tiny" if not quick else "fp32"].grpc_url, ceiling_folder, logs / "scan-ceiling.log"
    )
    return {"served": served, "ceiling": ceiling, "best_served_images_per_s": best}


def scan_line(scan: Dict[str, Any], summary: Dict[str, Any]) -> str:
    served, ceiling = scan["served"], scan["ceiling"]
    return (
        f"scan: {served['images']} real-size files at {served['images_per_s']:.2f} images/s against the served "
        f"checker ({summary['scan_vs_server']:.2f} of perf_analyzer's best fp32 row); against a tiny checker "
        f"{ceiling['images_per_s']:.1f} images/s, {ceiling['images_per_client_cpu_s']:.1f} images/s per client core"
    )


# The rows perf_analyzer measures.
PERF_KINDS = ("triton", "triton-int8", "cascade", "cascade-forced")


def _candidates(
    settings: Settings,
    servers: Dict[str, TritonServer],
    workers: Sequence[Worker],
    decoders: Dict[str, Worker],
    pixels: np.ndarray,
    cascade_data: Path,
    forced: Dict[str, Any],
    output: Path,
) -> List[Candidate]:
    diffusers, ort_fp32, ort_int8 = workers
    candidates = []
    for batch in settings.batches:
        for name, kind, worker in (
            (f"diffusers forward() fp32, batch {batch}", "baseline", diffusers),
            (f"onnxruntime fp32 in-process, batch {batch}", "ort", ort_fp32),
            (f"onnxruntime int8 in-process, batch {batch}", "ort-int8", ort_int8),
        ):
            candidates.append(
                Candidate(name, kind, lambda w, _, b=batch, worker=worker: worker.window(b, w), {"batch": batch})
            )
    photo_size = "x".join(str(d) for d in photo(DECODER_PHOTO).shape[:2])
    for extension, worker in decoders.items():
        candidates.append(
            Candidate(
                f"decoder alone, {photo_size} {extension.upper()} (one instance)",
                "decoder",
                lambda w, _, worker=worker: worker.window(1, w),
                {"batch": 1, "format": extension.upper()},
            )
        )

    stats = (spec.EMBEDDER_MODEL, spec.POSTPROCESS_MODEL, spec.ENSEMBLE_MODEL)
    cascade_stats = (spec.EMBEDDER_MODEL, spec.INT8_EMBEDDER_MODEL, spec.POSTPROCESS_MODEL)
    perf_rows = [
        ("triton fp32 (gRPC, perf_analyzer)", "triton", "fp32", spec.ENSEMBLE_MODEL, None, settings.concurrency, {}),
        (
            "triton int8 (gRPC, perf_analyzer)",
            "triton-int8",
            "int8",
            spec.ENSEMBLE_MODEL,
            None,
            settings.concurrency,
            {},
        ),
        (
            "triton cascade int8 -> fp32 (gRPC, perf_analyzer)",
            "cascade",
            "cascade",
            spec.ENSEMBLE_MODEL,
            cascade_data,
            settings.cascade_concurrency,
            {"cascade_model": spec.CASCADE_MODEL},
        ),
    ]
    for model, copy in forced["copies"].items():
        fraction = copy["fraction"]
        perf_rows.append(
            (
                f"triton cascade, bound forcing {fraction:.0%} to fp32 (gRPC, perf_analyzer)",
                "cascade-forced",
                "cascade",
                model,
                cascade_data,
                settings.cascade_concurrency,
                {"cascade_model": model, "forced_fallback": fraction, "cosine_bound": copy["cosine_bound"]},
            )
        )
    for label, kind, server_name, model, data, levels, extra in perf_rows:
        models = (*cascade_stats, extra["cascade_model"]) if "cascade_model" in extra else stats
        for concurrency in levels:
            slug = f"{kind}-{model}-c{concurrency}"

            def window(
                _: float,
                round_number: int,
                c: int = concurrency,
                server: TritonServer = servers[server_name],
                model: str = model,
                data: Optional[Path] = data,
                models: Sequence[str] = models,
                slug: str = slug,
            ) -> Dict[str, Any]:
                csv_file = output / "perf_analyzer" / f"{slug}-round{round_number}.csv"
                return served.window(server.grpc_url, model, c, settings.perf, csv_file, models, data)

            candidates.append(Candidate(label, kind, window, {"concurrency": concurrency, **extra}))

    files = encoded_requests()
    files_stats = (*stats, spec.IMAGES_MODEL)
    for concurrency in settings.images_concurrency:

        def images_window(w: float, _: int, c: int = concurrency) -> Dict[str, Any]:
            result = measure(
                servers["fp32"].grpc_url,
                spec.IMAGES_MODEL,
                files,
                c,
                w,
                warmup_s=settings.warmup_s,
                stats_models=files_stats,
            )
            return {"result": result}

        candidates.append(
            Candidate(
                "triton fp32 image files, PNG+JPEG (gRPC)", "triton-images", images_window, {"concurrency": concurrency}
            )
        )
    return candidates
