"""`python -m bench`: build, export and serve the checker, then measure every candidate side by side.

Candidates are interleaved window by window (round 1: every candidate once,
round 2: again, ...), so a slow drift of the machine (thermal, another job)
lands on all of them alike; each row pools its windows. The last line on
stdout is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench import report
from bench import scan as scan_bench
from bench.loadgen import LoadResult, measure
from export.quantize import REPORT_FILENAME
from fixtures.checkers import build_checker, save_checker
from fixtures.photos import PHOTOS, photo, photo_file
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_client import spec

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    window_s: float
    rounds: int
    warmup_s: float
    concurrency: Sequence[int]
    int8_concurrency: Sequence[int]
    batches: Sequence[int]  # for the in-process candidates


FULL = Settings(window_s=20.0, rounds=2, warmup_s=3.0, concurrency=(1, 2, 4, 8), int8_concurrency=(4,), batches=(1, 4))
QUICK = Settings(window_s=1.0, rounds=1, warmup_s=0.3, concurrency=(1, 2), int8_concurrency=(2,), batches=(1,))


@dataclass
class Candidate:
    """One row of the table: something measured for one window at a time."""

    name: str
    kind: str  # baseline | ort | ort-int8 | decoder | triton | triton-images | triton-int8
    window: Callable[[float], Dict[str, Any]]
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
    simd = [name for name in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f" {name}" in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = f"{model}, {cores} cores ({', '.join(simd) or 'no AVX2'}), CPU only"
    return {
        "description": description,
        "cpu": model,
        "cores": cores,
        "simd": simd,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "triton": "2.51 (nvidia-pytriton 0.7.0)",
    }


def bench_pixels() -> np.ndarray:
    """Real photographs through the client's preprocessing: 8 images, the largest in-process batch."""
    from safety_checker_client.preprocess import preprocess

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


def _pooled_worker_row(candidate: Candidate) -> Dict[str, Any]:
    images = sum(w["images"] for w in candidate.windows)
    seconds = sum(w["seconds"] for w in candidate.windows)
    latencies = [x for w in candidate.windows for x in w["latencies_ms"]]
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        "images_per_s": images / seconds,
        "images": images,
        "seconds": seconds,
        "calls": len(latencies),
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "mean": float(np.mean(latencies))},
    }


def _pooled_triton_row(candidate: Candidate) -> Dict[str, Any]:
    results: List[LoadResult] = [w["result"] for w in candidate.windows]
    pooled = LoadResult(
        concurrency=results[0].concurrency,
        batch=results[0].batch,
        requests=sum(r.requests for r in results),
        window_s=sum(r.window_s for r in results),
        latencies_ms=[x for r in results for x in r.latencies_ms],
        errors=sum(r.errors for r in results),
        first_error=next((r.first_error for r in results if r.first_error), None),
        server=_pooled_server_stats([r.server for r in results]),
        cycles=sum(r.cycles for r in results),
        cycle_s=sum(r.cycle_s for r in results),
    )
    return pooled.as_dict()


def _pooled_server_stats(windows: List[Dict[str, Dict[str, Optional[float]]]]) -> Dict[str, Dict[str, Any]]:
    """Sum the counts of every window; averages weighted by the requests they cover."""
    pooled: Dict[str, Dict[str, Any]] = {}
    for model in windows[0]:
        stats = [w[model] for w in windows]
        executions = sum(s["executions"] for s in stats)
        inferences = sum(s["inferences"] for s in stats)
        requests = sum(s["requests"] for s in stats)
        entry: Dict[str, Any] = {
            "executions": executions,
            "inferences": inferences,
            "requests": requests,
            "failures": sum(s["failures"] for s in stats),
            "avg_batch_size": inferences / executions if executions else None,
        }
        for key in ("avg_queue_ms", "avg_compute_input_ms", "avg_compute_infer_ms", "avg_compute_output_ms"):
            weighted = [(s[key], s["requests"]) for s in stats if s[key] is not None]
            total = sum(n for _, n in weighted)
            entry[key] = sum(v * n for v, n in weighted) / total if total else None
        pooled[model] = entry
    return pooled


def summarize(rows: List[Dict[str, Any]], scan: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    def best(kind: str) -> Optional[Dict[str, Any]]:
        candidates = [r for r in rows if r["kind"] == kind]
        return max(candidates, key=lambda r: r["images_per_s"]) if candidates else None

    diffusers, ort, triton = best("baseline"), best("ort"), best("triton")
    summary = {
        "diffusers_images_per_s": diffusers["images_per_s"],
        "ort_images_per_s": ort["images_per_s"],
        "triton_images_per_s": triton["images_per_s"],
        "triton_best_concurrency": triton["concurrency"],
        "speedup_vs_diffusers": triton["images_per_s"] / diffusers["images_per_s"],
        "triton_vs_ort": triton["images_per_s"] / ort["images_per_s"],
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
        summary["triton_int8_images_per_s"] = int8["images_per_s"]
        summary["int8_speedup_vs_diffusers"] = int8["images_per_s"] / diffusers["images_per_s"]
        summary["triton_int8_vs_ort_int8"] = int8["images_per_s"] / ort_int8["images_per_s"]
    if scan:
        served, ceiling = scan["served"], scan["ceiling"]
        summary["scan_images_per_s"] = served["images_per_s"]
        summary["scan_vs_server"] = served["images_per_s"] / triton["images_per_s"]
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
        help="folder for results.json, throughput.png and logs (default bench-results)",
    )
    parser.add_argument("--window", type=float, help="seconds per measurement window")
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
    started = time.monotonic()
    say = lambda message: tqdm.write(message, file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="safety-checker-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        say(f"building the {'tiny' if args.quick else 'full-size (ViT-L/14)'} checker with random weights")
        save_checker(scratch / "checker", build_checker("tiny" if args.quick else "full"))
        say("exporting fp32 and int8 model repositories with `python -m export`")
        export(scratch / "checker", scratch / "fp32", logs / "export-fp32.log")
        export(scratch / "checker", scratch / "int8", logs / "export-int8.log", "--int8")
        names = ["fp32", "int8"]
        if not args.quick:  # the client's ceiling needs a server that costs almost nothing: a tiny checker
            save_checker(scratch / "tiny-checker", build_checker("tiny"))
            export(scratch / "tiny-checker", scratch / "tiny", logs / "export-tiny.log")
            names.append("tiny")
        int8_report = json.loads((scratch / "int8" / spec.EMBEDDER_MODEL / "1" / REPORT_FILENAME).read_text())
        pixels = bench_pixels()
        np.save(scratch / "pixels.npy", pixels)
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
            for server in servers.values():
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
            candidates = _candidates(settings, servers, diffusers, ort_fp32, ort_int8, decoders, pixels)

            bar = tqdm(total=settings.rounds * len(candidates), unit="window", file=sys.stderr)
            for round_index in range(settings.rounds):
                for candidate in candidates:
                    bar.set_description(f"round {round_index + 1}/{settings.rounds}: {candidate.label}")
                    candidate.windows.append(candidate.window(settings.window_s))
                    bar.update()
            bar.close()
            best = max(_pooled_triton_row(c)["images_per_s"] for c in candidates if c.kind == "triton")
            scan = _scan(settings, servers, best, scratch, logs, say)
        finally:
            for worker in workers:
                worker.close()
            for server in servers.values():
                server.stop()

    rows = []
    for candidate in candidates:
        pooled = _pooled_triton_row(candidate) if candidate.kind.startswith("triton") else _pooled_worker_row(candidate)
        rows.append({"name": candidate.name, "kind": candidate.kind, **candidate.extra, **pooled})
    results = {
        "machine": machine(),
        "settings": {
            **settings.__dict__,
            "interleaved": True,
            "duration_s": round(time.monotonic() - started, 1),
            "model": "tiny (--quick)" if args.quick else "full-size ViT-L/14, random weights",
        },
        "int8_report": int8_report,
        "rows": rows,
        "scan": scan,
        "summary": summarize(rows, scan),
    }
    report.write_json(results, output / "results.json")
    report.plot(results, output / "throughput.png")
    print(report.table(results))
    print(scan_line(scan, results["summary"]))
    print(f"results: {output / 'results.json'}, plot: {output / 'throughput.png'}")
    print(json.dumps(results["summary"]))
    return 0


# Images in the scan against the served checker: about as long as the load generator's windows together.
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
        f"checker ({summary['scan_vs_server']:.2f} of the load generator's best); against a tiny checker "
        f"{ceiling['images_per_s']:.1f} images/s, {ceiling['images_per_client_cpu_s']:.1f} images/s per client core"
    )


def _candidates(
    settings: Settings,
    servers: Dict[str, TritonServer],
    diffusers: Worker,
    ort_fp32: Worker,
    ort_int8: Worker,
    decoders: Dict[str, Worker],
    pixels: np.ndarray,
) -> List[Candidate]:
    candidates = []
    for batch in settings.batches:
        candidates.append(
            Candidate(
                f"diffusers forward() fp32, batch {batch}",
                "baseline",
                lambda w, b=batch: diffusers.window(b, w),
                {"batch": batch},
            )
        )
        candidates.append(
            Candidate(
                f"onnxruntime fp32 in-process, batch {batch}",
                "ort",
                lambda w, b=batch: ort_fp32.window(b, w),
                {"batch": batch},
            )
        )
    candidates.append(
        Candidate("onnxruntime int8 in-process, batch 1", "ort-int8", lambda w: ort_int8.window(1, w), {"batch": 1})
    )
    photo_size = "x".join(str(d) for d in photo(DECODER_PHOTO).shape[:2])
    for extension, worker in decoders.items():
        candidates.append(
            Candidate(
                f"decoder alone, {photo_size} {extension.upper()} (one instance)",
                "decoder",
                lambda w, worker=worker: worker.window(1, w),
                {"batch": 1, "format": extension.upper()},
            )
        )
    request = {spec.PIXEL_VALUES.name: pixels[:1]}
    stats = (spec.EMBEDDER_MODEL, spec.POSTPROCESS_MODEL, spec.ENSEMBLE_MODEL)
    files = encoded_requests()
    files_stats = (*stats, spec.IMAGES_MODEL)
    for name, kind, levels, model, requests, models in (
        ("fp32", "triton", settings.concurrency, spec.ENSEMBLE_MODEL, request, stats),
        ("fp32", "triton-images", settings.concurrency, spec.IMAGES_MODEL, files, files_stats),
        ("int8", "triton-int8", settings.int8_concurrency, spec.ENSEMBLE_MODEL, request, stats),
    ):
        label = f"triton {name} image files, PNG+JPEG (gRPC)" if kind == "triton-images" else f"triton {name} (gRPC)"
        for concurrency in levels:

            def window(
                w: float,
                c: int = concurrency,
                server: TritonServer = servers[name],
                model=model,
                inputs=requests,
                models=models,
            ) -> Dict[str, Any]:
                return {
                    "result": measure(
                        server.grpc_url,
                        model,
                        inputs,
                        c,
                        w,
                        warmup_s=settings.warmup_s,
                        stats_models=models,
                    )
                }

            candidates.append(Candidate(label, kind, window, {"concurrency": concurrency}))
    return candidates
