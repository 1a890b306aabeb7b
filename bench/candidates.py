"""The candidates: one per row of the table, each measuring one window when the run asks it to.

In-process rows ask their worker process (bench/worker.py); the served pixel
rows run perf_analyzer once per window (served.py); the image-file rows run the
load generator (loadgen.py), straight to Triton and through the gateway
(gateway.py). Only the kinds the selection holds are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Optional, Sequence

import tritonclient.grpc as grpcclient

from bench import gateway, pipeline, pipeline_data, served
from bench.harness import Harness, Worker
from bench.inputs import decoder_photo_size, encoded_files, encoded_requests
from bench.loadgen import measure
from bench.selection import Selection
from bench.settings import Settings
from safety_checker_client import spec

# The rows perf_analyzer measures.
PERF_KINDS = ("triton", "triton-int8", "cascade", "cascade-forced", pipeline.KIND)
# Whose statistics each kind of served row reads, besides a cascade row's own model.
STATS = (spec.EMBEDDER_MODEL, spec.POSTPROCESS_MODEL, spec.ENSEMBLE_MODEL)
CASCADE_STATS = (spec.EMBEDDER_MODEL, spec.INT8_EMBEDDER_MODEL, spec.POSTPROCESS_MODEL)
FILES_STATS = (*STATS, spec.IMAGES_MODEL)
GATEWAY_ROW = "gateway, the seed's route: the same files, base64 in JSON (HTTP)"
# The in-process rows by kind, in the order each batch measures them.
IN_PROCESS = {
    "baseline": "diffusers forward() fp32",
    "ort": "onnxruntime fp32 in-process",
    "ort-int8": "onnxruntime int8 in-process",
}

Window = Callable[[float, int], Dict[str, Any]]  # (window_s, round) -> what the window measured


@dataclass
class Candidate:
    """One row of the table: something measured for one window at a time."""

    name: str
    # baseline | ort | ort-int8 | decoder | triton | triton-int8 | triton-images | gateway | cascade | cascade-forced
    kind: str
    window: Window
    extra: Dict[str, Any] = field(default_factory=dict)
    windows: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        where = self.extra.get("concurrency")
        return f"{self.name} c={where}" if where else self.name


class PerfRow(NamedTuple):
    """A served pixel row: measured by perf_analyzer at each of `levels` against `model` on one server."""

    label: str
    kind: str
    server: str  # the repository serving it: fp32, int8 or cascade
    model: str
    data: Optional[Path]  # perf_analyzer's input data; None: its own random pixels
    levels: Sequence[int]
    extra: Dict[str, Any]


def candidates(settings: Settings, selection: Selection, built: Harness, output: Path) -> List[Candidate]:
    """Every selected row, in table order: in-process, decoder, perf_analyzer's, then the image files."""
    kinds = selection.kinds
    rows = _in_process(settings, kinds, built.workers)
    if "decoder" in kinds:
        rows += _decoders(built.decoders)
    for row in perf_rows(settings, kinds, built):
        rows += [
            Candidate(
                row.label, row.kind, _perf_window(settings, built, row, c, output), {"concurrency": c, **row.extra}
            )
            for c in row.levels
        ]
    if "triton-images" in kinds:
        rows += _image_files(settings, built)
    if "gateway" in kinds:
        rows += _gateway(settings, built)
    if pipeline.KIND in kinds:
        rows += _pipeline(settings, built, output)
    return rows


def _pipeline(settings: Settings, built: Harness, output: Path) -> List[Candidate]:
    """The tiny checker's paths at each batch and concurrency, then its gateway (bench/pipeline.py)."""
    server = built.pipeline_server
    cores = pipeline.server_cores(server.pid)
    folder = output / "perf_analyzer"
    data = pipeline_data.write_input_data(folder / "pipeline-input")
    rows = []
    for batch in settings.pipeline_batches:
        for path in pipeline.PATHS:
            rows += [
                Candidate(
                    pipeline.label(path.name, path.model, batch),
                    pipeline.KIND,
                    pipeline.perf_window(
                        server.grpc_url, path, batch, c, settings.pipeline_perf, data[path.model], folder
                    ),
                    {"concurrency": c, "batch": batch, "path": path.name, "model": path.model, "server_cores": cores},
                )
                for c in settings.pipeline_concurrency
            ]
    front = built.pipeline_gateway
    if front is not None:
        bodies = gateway.seed_bodies(pipeline_data.files())
        rows += [
            Candidate(
                pipeline.GATEWAY_LABEL,
                pipeline.GATEWAY_KIND,
                pipeline.gateway_window(front.url, server.grpc_url, bodies, c, settings.warmup_s, front.cpu_s),
                {"concurrency": c, "batch": 1, "path": pipeline.GATEWAY, "server_cores": cores},
            )
            for c in settings.pipeline_concurrency
        ]
    return rows


def _in_process(settings: Settings, kinds: FrozenSet[str], workers: Dict[str, Worker]) -> List[Candidate]:
    rows = []
    for batch in settings.batches:
        for kind, name in IN_PROCESS.items():
            if kind in kinds:
                window = _worker_window(workers[kind], batch)
                rows.append(Candidate(f"{name}, batch {batch}", kind, window, {"batch": batch}))
    return rows


def _worker_window(worker: Worker, batch: int) -> Window:
    return lambda window_s, _: worker.window(batch, window_s)


def _decoders(decoders: Dict[str, Worker]) -> List[Candidate]:
    return [
        Candidate(
            f"decoder alone, {decoder_photo_size()} {extension.upper()} (one instance)",
            "decoder",
            _worker_window(worker, 1),
            {"batch": 1, "format": extension.upper()},
        )
        for extension, worker in decoders.items()
    ]


def perf_rows(settings: Settings, kinds: FrozenSet[str], built: Harness) -> List[PerfRow]:
    """The served pixel rows the selection holds: fp32, int8, the cascade and its forced-fallback copies."""
    ensemble = spec.ENSEMBLE_MODEL
    rows = [
        PerfRow("triton fp32 (gRPC, perf_analyzer)", "triton", "fp32", ensemble, None, settings.concurrency, {}),
        PerfRow("triton int8 (gRPC, perf_analyzer)", "triton-int8", "int8", ensemble, None, settings.concurrency, {}),
        PerfRow(
            "triton cascade int8 -> fp32 (gRPC, perf_analyzer)",
            "cascade",
            "cascade",
            ensemble,
            built.cascade_data,
            settings.cascade_concurrency,
            {"cascade_model": spec.CASCADE_MODEL},
        ),
    ]
    copies = built.forced["copies"] if built.forced else {}
    for model, copy in copies.items():
        fraction = copy["fraction"]
        rows.append(
            PerfRow(
                f"triton cascade, bound forcing {fraction:.0%} to fp32 (gRPC, perf_analyzer)",
                "cascade-forced",
                "cascade",
                model,
                built.cascade_data,
                settings.cascade_concurrency,
                {"cascade_model": model, "forced_fallback": fraction, "cosine_bound": copy["cosine_bound"]},
            )
        )
    return [row for row in rows if row.kind in kinds]


def _perf_window(settings: Settings, built: Harness, row: PerfRow, concurrency: int, output: Path) -> Window:
    server = built.servers[row.server]
    models = (*CASCADE_STATS, row.extra["cascade_model"]) if "cascade_model" in row.extra else STATS
    slug = f"{row.kind}-{row.model}-c{concurrency}"

    def window(_: float, round_number: int) -> Dict[str, Any]:
        csv_file = output / "perf_analyzer" / f"{slug}-round{round_number}.csv"
        return served.window(server.grpc_url, row.model, concurrency, settings.perf, csv_file, models, row.data)

    return window


def _image_files(settings: Settings, built: Harness) -> List[Candidate]:
    files = encoded_requests()
    server = built.servers["fp32"]

    def images_window(concurrency: int) -> Window:
        def window(w: float, _: int) -> Dict[str, Any]:
            result = measure(
                server.grpc_url,
                spec.IMAGES_MODEL,
                files,
                concurrency,
                w,
                warmup_s=settings.warmup_s,
                stats_models=FILES_STATS,
            )
            return {"result": result}

        return window

    return [
        Candidate("triton fp32 image files, PNG+JPEG (gRPC)", "triton-images", images_window(c), {"concurrency": c})
        for c in settings.images_concurrency
    ]


def _gateway(settings: Settings, built: Harness) -> List[Candidate]:
    """The images row's files, each as the seed's callers send it, through `safety-checker gateway`."""
    bodies = gateway.seed_bodies(encoded_files())
    server = built.servers["fp32"]

    def gateway_window(concurrency: int) -> Window:
        def window(w: float, _: int) -> Dict[str, Any]:
            control = grpcclient.InferenceServerClient(server.grpc_url)
            try:
                return gateway.measure(
                    built.gateway.url,
                    bodies,
                    concurrency,
                    w,
                    settings.warmup_s,
                    triton_client=control,
                    stats_models=FILES_STATS,
                    gateway_cpu=built.gateway.cpu_s,
                )
            finally:
                control.close()

        return window

    return [
        Candidate(GATEWAY_ROW, "gateway", gateway_window(c), {"concurrency": c}) for c in settings.images_concurrency
    ]
