"""Setting up what the selected rows measure, in one place: build the checker, export its repositories, serve
them, start the in-process workers, and stop them all when the run ends.

A run of a few rows (`--rows`) exports, serves and starts only what those rows
use (bench/selection.py says what each needs).
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from bench import cascade, perf_data
from bench.gateway import GatewayProcess
from bench.inputs import DECODER_PHOTO, ENCODED_FORMATS, bench_pixels, cascade_images
from bench.selection import Selection
from bench.settings import FORCED_FALLBACKS
from export.quantize import REPORT_FILENAME
from fixtures.checkers import build_checker, save_checker
from fixtures.photos import photo_file
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_client import spec
from safety_checker_client.preprocess import preprocess

ROOT = Path(__file__).resolve().parent.parent
# `python -m export` options of each repository exported from the benchmark's checker.
EXPORT_OPTIONS = {"fp32": (), "int8": ("--int8",), "cascade": ("--cascade",)}

Say = Callable[[str], None]


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


@dataclass
class Harness:
    """What the set-up built for the selected rows: the servers, workers and data their windows use."""

    scratch: Path
    servers: Dict[str, TritonServer] = field(default_factory=dict)  # by repository: fp32, int8, cascade, tiny
    workers: Dict[str, Worker] = field(default_factory=dict)  # by row kind: baseline, ort, ort-int8
    decoders: Dict[str, Worker] = field(default_factory=dict)  # by file extension
    cascade_repeat: int = 1  # how many times in a row the cascade's input data holds each image
    cascade_data: Optional[Path] = None  # perf_analyzer's input data for the cascade rows
    forced: Optional[Dict[str, Any]] = None  # the cascade's critical bounds and forced-fallback copies
    int8_report: Optional[Dict[str, Any]] = None
    gateway: Optional[GatewayProcess] = None  # `safety-checker gateway` in front of the fp32 server
    pipeline_gateway: Optional[GatewayProcess] = None  # the gateway in front of the pipeline rows' server

    @property
    def pipeline_server(self) -> TritonServer:
        """The tiny checker's server the pipeline rows measure (with --quick, the fp32 one is the tiny checker)."""
        return self.servers["tiny"] if "tiny" in self.servers else self.servers["fp32"]


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


@contextlib.contextmanager
def harness(
    selection: Selection, quick: bool, scratch: Path, logs: Path, say: Say, cascade_concurrency: Sequence[int] = (1,)
) -> Iterator[Harness]:
    """Build, export and serve what `selection` measures; stop every server and worker on the way out.
    `cascade_concurrency`: the concurrencies the cascade rows run at (their input data is written for them)."""
    built = Harness(scratch, cascade_repeat=math.lcm(*cascade_concurrency))
    _build_and_export(selection, quick, scratch, logs, say)
    if "int8" in selection.exports(quick):
        built.int8_report = json.loads((scratch / "int8" / spec.EMBEDDER_MODEL / "1" / REPORT_FILENAME).read_text())
    names = selection.serves(quick)
    say(_starting(names, selection))
    built.servers = {
        name: TritonServer(scratch / name, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        for name in names
    }
    try:
        _start_servers(built, say)
        _start_workers(built, selection, logs)
        if "gateway" in selection.kinds:
            say("starting `safety-checker gateway` in front of the fp32 server")
            built.gateway = GatewayProcess(built.servers["fp32"].grpc_url, logs / "gateway.log")
        if "pipeline" in selection.kinds:
            _start_pipeline_gateway(built, logs, say)
        yield built
    finally:
        for process in (built.gateway, built.pipeline_gateway):  # closing one twice (--quick's shared one) is fine
            if process is not None:
                process.close()
        for worker in [*built.workers.values(), *built.decoders.values()]:
            worker.close()
        for server in built.servers.values():
            server.stop()


def _start_pipeline_gateway(built: Harness, logs: Path, say: Say) -> None:
    """The pipeline's gateway: the fp32 server's own when that is the pipeline's server (--quick), else a new one."""
    if built.gateway is not None and built.pipeline_server is built.servers.get("fp32"):
        built.pipeline_gateway = built.gateway
        return
    say("starting `safety-checker gateway` in front of the tiny checker's server (the pipeline rows)")
    built.pipeline_gateway = GatewayProcess(built.pipeline_server.grpc_url, logs / "gateway-pipeline.log")


def _starting(servers: List[str], selection: Selection) -> str:
    what = [f"{len(servers)} tritonserver{'s' if len(servers) > 1 else ''} ({', '.join(servers)})"] if servers else []
    if selection.kinds & {"baseline", "ort", "ort-int8", "decoder"}:
        what.append("the in-process workers")
    return f"starting {' and '.join(what) or 'nothing'}"


def _listed(names: List[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def _build_and_export(selection: Selection, quick: bool, scratch: Path, logs: Path, say: Say) -> None:
    say(f"building the {'tiny' if quick else 'full-size (ViT-L/14)'} checker with random weights")
    save_checker(scratch / "checker", build_checker("tiny" if quick else "full"))
    names = selection.exports(quick)
    own = [name for name in names if name in EXPORT_OPTIONS]
    if own:
        say(
            f"exporting {_listed(own)} model {'repositories' if len(own) > 1 else 'repository'} with `python -m export`"
        )
    for name in own:
        export(scratch / "checker", scratch / name, logs / f"export-{name}.log", *EXPORT_OPTIONS[name])
    if "tiny" in names:  # the client's ceiling needs a server that costs almost nothing: a tiny checker
        save_checker(scratch / "tiny-checker", build_checker("tiny"))
        export(scratch / "tiny-checker", scratch / "tiny", logs / "export-tiny.log")


def _start_servers(built: Harness, say: Say) -> None:
    """Start every server; with the cascade, the int8 one first, to find the forced-fallback bounds."""
    first = None
    if "cascade" in built.servers:
        _prepare_cascade(built, say)
        first = built.servers["int8"]
    for server in built.servers.values():
        if server is not first:
            server.start()


def _prepare_cascade(built: Harness, say: Say) -> None:
    """The cascade rows' input data, and the copies of the cascade that force FORCED_FALLBACKS to fp32."""
    scratch = built.scratch
    photos = cascade_images()
    built.cascade_data = scratch / "cascade-images.json"
    # Each image alike in perf_analyzer's requests, at every concurrency the cascade rows run at.
    data = perf_data.input_data(spec.ENSEMBLE_MODEL, photos, built.cascade_repeat)
    built.cascade_data.write_text(perf_data.render(data))
    # The int8 server's embedder is the cascade's int8 embedder (one quantisation of one checkpoint):
    # it finds the bounds of the forced-fallback copies before the cascade server starts.
    int8_onnx = scratch / "int8" / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME
    if not filecmp.cmp(int8_onnx, scratch / "cascade" / spec.INT8_EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME):
        raise RuntimeError("the int8 and cascade exports quantised the checkpoint differently")
    built.servers["int8"].start()
    built.forced = _add_forced_copies(built.servers["int8"].grpc_url, preprocess(photos), scratch / "cascade", say)


def _add_forced_copies(url: str, pixels: np.ndarray, repository: Path, say: Say) -> Dict[str, Any]:
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


def _start_workers(built: Harness, selection: Selection, logs: Path) -> None:
    """The in-process candidates, each in a process of its own (bench/worker.py)."""
    scratch = built.scratch
    embedder = Path(spec.EMBEDDER_MODEL) / "1" / spec.ONNX_FILENAME
    in_process = {  # row kind: (worker kind, model, log)
        "baseline": ("diffusers", scratch / "checker", "diffusers.log"),
        "ort": ("onnxruntime", scratch / "fp32" / embedder, "onnxruntime-fp32.log"),
        "ort-int8": ("onnxruntime", scratch / "int8" / embedder, "onnxruntime-int8.log"),
    }
    selected = [kind for kind in in_process if kind in selection.kinds]
    if selected:
        np.save(scratch / "pixels.npy", bench_pixels())
    for kind in selected:
        worker, model, log = in_process[kind]
        built.workers[kind] = Worker(worker, model, scratch / "pixels.npy", logs / log)
    if "decoder" in selection.kinds:
        config = scratch / "fp32" / spec.DECODE_MODEL / "config.pbtxt"
        for extension in ENCODED_FORMATS:
            path = scratch / f"{DECODER_PHOTO}.{extension}"
            path.write_bytes(photo_file(DECODER_PHOTO, extension))
            built.decoders[extension] = Worker("decoder", config, path, logs / f"decoder-{extension}.log")
