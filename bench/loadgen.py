"""A perf_analyzer-style closed-loop load generator, in Python.

Why not perf_analyzer itself: it ships in Triton's SDK container, not in the
pip wheels this project runs on. This module reproduces its concurrency mode
closely enough to compare candidates on one machine: `concurrency` threads,
each with its own tritonclient connection and exactly one request outstanding
at all times (a synchronous `infer` in a loop), a warm-up, then a fixed
measurement window. Server-side statistics (Triton's statistics extension) are
sampled at both window edges so the report can show what the dynamic batcher
did: average batch size, queueing and compute time per request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from safety_checker_client.client import triton_module

# numpy.percentile interpolation used for the latency percentiles.
PERCENTILE_METHOD = "linear"
# Pause after a failed request, so an unreachable server is not hammered in a busy loop.
ERROR_BACKOFF_S = 0.01
# Fields of $duration_stat objects in inference_stats that we turn into per-request averages.
_DURATIONS = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class LoadResult:
    """What one `measure` run saw.

    `requests` counts successful requests that completed inside the window;
    the latency percentiles come from exactly those samples, so with ~1 s
    requests and a 20 s window they rest on a few dozen values.
    `errors` counts every failed request of the whole run (warm-up and drain
    included), so that a run with any failure is visible in the results.
    """

    concurrency: int
    batch: int
    requests: int
    window_s: float
    latencies_ms: List[float] = field(repr=False)
    errors: int = 0
    first_error: Optional[str] = None
    server: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)
    # Whole client cycles (send to next send) inside the window: their count and summed length.
    cycles: int = 0
    cycle_s: float = 0.0

    @property
    def images(self) -> int:
        return self.requests * self.batch

    @property
    def images_per_s(self) -> float:
        """concurrency x batch / mean cycle time; the completion count if no client finished a cycle.

        With ~1 s requests answered in dynamic batches, completions arrive in
        bursts, so counting them in a window is quantised by the batch (a
        burst more or less is 5-10% of a 20 s window). Each client's cycles
        are sequential, so its rate is exactly cycles / their duration, and
        the rates of the clients add up.
        """
        if self.cycles:
            return self.concurrency * self.batch * self.cycles / self.cycle_s
        return self.images / self.window_s if self.window_s > 0 else 0.0

    @property
    def completed_images_per_s(self) -> float:
        """perf_analyzer's way: images completed inside the window / its length."""
        return self.images / self.window_s if self.window_s > 0 else 0.0

    def latency_ms(self) -> Dict[str, Optional[float]]:
        """p50/p95/p99 (numpy.percentile, method="linear") and mean; None without samples."""
        if not self.latencies_ms:
            return {"p50": None, "p95": None, "p99": None, "mean": None}
        values = np.asarray(self.latencies_ms, dtype=np.float64)
        p50, p95, p99 = np.percentile(values, [50, 95, 99], method=PERCENTILE_METHOD)
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(values.mean())}

    def as_dict(self) -> Dict[str, object]:
        """JSON-ready view (the raw latency samples are left out)."""
        return {
            "concurrency": self.concurrency,
            "batch": self.batch,
            "images_per_s": self.images_per_s,
            "completed_images_per_s": self.completed_images_per_s,
            "cycles": self.cycles,
            "requests": self.requests,
            "images": self.images,
            "window_s": self.window_s,
            "latency_ms": self.latency_ms(),
            "errors": self.errors,
            "first_error": self.first_error,
            "server": self.server,
        }


def _error_text(err: BaseException) -> str:
    """InferenceServerException keeps the server's words in message(); str() adds the status."""
    message = getattr(err, "message", None)
    text = message() if callable(message) else str(err)
    return f"{type(err).__name__}: {text}"


Inputs = Mapping[str, np.ndarray]


def _requests(inputs: Union[Inputs, Sequence[Inputs]]) -> List[Inputs]:
    """One request's inputs, or several that each client sends in turn."""
    requests = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not requests:
        raise ValueError("no requests given")
    return requests


def _batch_of(inputs: Union[Inputs, Sequence[Inputs]]) -> int:
    batches = set()
    for request in _requests(inputs):
        if not request:
            raise ValueError("no inputs given")
        sizes = {name: int(np.shape(array)[0]) for name, array in request.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"inputs disagree on the batch (first axis): {sizes}")
        batches.add(next(iter(sizes.values())))
    if len(batches) != 1:
        raise ValueError(f"requests of different batch sizes: {sorted(batches)}")
    return batches.pop()


def _output_names(client, model_name: str, protocol: str) -> List[str]:
    """Every output the model declares, so each request asks for the full answer a user gets."""
    metadata = (
        client.get_model_metadata(model_name, as_json=True)
        if protocol == "grpc"
        else client.get_model_metadata(model_name)
    )
    return [output["name"] for output in metadata.get("outputs", [])]


def stats_counters(client, model_name: str, protocol: str) -> Dict[str, int]:
    """Cumulative counters of one model, summed over its versions.

    Field names are those of Triton's statistics extension
    (docs/protocol/extension_statistics.md): per model `execution_count`,
    `inference_count` and `inference_stats.{success,fail,queue,compute_input,
    compute_infer,compute_output}.{count,ns}`. gRPC's JSON comes from
    protobuf's MessageToJson, which writes uint64 as strings and leaves out
    zero fields, hence int() and the defaults.
    """
    if protocol == "grpc":
        stats = client.get_inference_statistics(model_name, as_json=True)
    else:
        stats = client.get_inference_statistics(model_name)
    counters: Dict[str, int] = {}

    def add(key: str, value: object) -> None:
        counters[key] = counters.get(key, 0) + int(value or 0)

    for model in stats.get("model_stats", []):
        add("execution_count", model.get("execution_count"))
        add("inference_count", model.get("inference_count"))
        inference_stats = model.get("inference_stats", {})
        for name in ("success", "fail") + _DURATIONS:
            duration = inference_stats.get(name, {})
            add(f"{name}.count", duration.get("count"))
            add(f"{name}.ns", duration.get("ns"))
    return counters


def stats_delta(start: Dict[str, int], end: Dict[str, int]) -> Dict[str, Optional[float]]:
    """What happened between two samples: counts, and per-request averages in ms (None if no requests)."""
    delta = {key: end.get(key, 0) - start.get(key, 0) for key in set(start) | set(end)}
    executions, inferences = delta.get("execution_count", 0), delta.get("inference_count", 0)
    result: Dict[str, Optional[float]] = {
        "executions": executions,
        "inferences": inferences,
        "requests": delta.get("success.count", 0),
        "failures": delta.get("fail.count", 0),
        "avg_batch_size": inferences / executions if executions else None,
    }
    for name in _DURATIONS:
        count = delta.get(f"{name}.count", 0)
        result[f"avg_{name}_ms"] = delta.get(f"{name}.ns", 0) / count / 1e6 if count else None
    return result


class _Recorder:
    """Thread-safe collection of (send, receive) times and errors from the workers."""

    def __init__(self, progress: Optional[Callable[[], None]]) -> None:
        self._lock = threading.Lock()
        self._progress = progress
        self.completed: List[Tuple[int, float, float]] = []  # (client, sent, received)
        self.errors = 0
        self.first_error: Optional[Tuple[float, str]] = None

    def success(self, client: int, sent: float, received: float) -> None:
        with self._lock:
            self.completed.append((client, sent, received))
            if self._progress is not None:
                self._progress()

    def failure(self, when: float, err: BaseException) -> None:
        with self._lock:
            self.errors += 1
            if self.first_error is None or when < self.first_error[0]:
                self.first_error = (when, _error_text(err))
            if self._progress is not None:
                self._progress()


def infer_inputs(module, inputs: Inputs) -> list:
    """tritonclient (`module`: its grpc or http) InferInputs for name -> array; the datatype follows the numpy dtype."""
    tensors = []
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _worker(
    index: int,
    module,
    url: str,
    model_name: str,
    inputs: Sequence[Inputs],
    outputs: Sequence[str],
    stop: threading.Event,
    recorder: _Recorder,
) -> None:
    """One closed loop: send, wait for the answer, send again, until `stop`; the requests in turn, starting
    at this client's index."""
    try:
        client = module.InferenceServerClient(url)
    except Exception as err:  # a malformed URL; tritonclient raises several types
        recorder.failure(time.perf_counter(), err)
        return
    try:
        requests = [infer_inputs(module, request) for request in inputs]
        requested = [module.InferRequestedOutput(name) for name in outputs]
        turn = index
        while not stop.is_set():
            tensors = requests[turn % len(requests)]
            turn += 1
            sent = time.perf_counter()
            try:
                client.infer(model_name, tensors, outputs=requested or None)
            except Exception as err:  # server refusals and transport errors alike
                recorder.failure(time.perf_counter(), err)
                time.sleep(ERROR_BACKOFF_S)
                continue
            recorder.success(index, sent, time.perf_counter())
    finally:
        client.close()


def measure(
    url: str,
    model_name: str,
    inputs: Union[Inputs, Sequence[Inputs]],
    concurrency: int,
    window_s: float,
    warmup_s: float = 5.0,
    protocol: str = "grpc",
    stats_models: Sequence[str] = (),
    progress: Optional[Callable[[], None]] = None,
) -> LoadResult:
    """Drive `model_name` at `url` with `concurrency` outstanding requests and measure one window.

    `inputs` maps input name -> array whose first axis is the batch of one
    request (or is a list of such requests, of one batch size, which each
    client sends in turn); the Triton datatype follows the numpy dtype (object
    arrays of bytes are BYTES). Every request asks for all outputs in the
    model's metadata.

    Throughput is measured per client cycle (see `LoadResult.images_per_s`);
    perf_analyzer's count of requests *completed* inside the window x batch /
    the window's length is reported beside it. The completed requests'
    send->receive times give the latencies. Requests in flight at the window edges are attributed to the
    window they complete in, and the server statistics of `stats_models` are
    differenced between the same two instants, so both are cut at the edges
    (a few requests' worth of difference with ~1 s requests; longer windows
    make it smaller).

    `progress` is called once per completed request (warm-up included, failed
    ones too), from the worker threads, one call at a time.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, not {window_s}")
    module = triton_module(protocol)
    batch = _batch_of(inputs)
    requests = _requests(inputs)

    control = module.InferenceServerClient(url)
    try:
        outputs = _output_names(control, model_name, protocol)
        recorder = _Recorder(progress)
        stop = threading.Event()
        workers = [
            threading.Thread(
                target=_worker,
                name=f"loadgen-{i}",
                daemon=True,
                args=(i, module, url, model_name, requests, outputs, stop, recorder),
            )
            for i in range(concurrency)
        ]
        for worker in workers:
            worker.start()
        try:
            time.sleep(warmup_s)
            stats_start = {name: stats_counters(control, name, protocol) for name in stats_models}
            window_start = time.perf_counter()
            time.sleep(window_s)
            window_end = time.perf_counter()
            stats_end = {name: stats_counters(control, name, protocol) for name in stats_models}
        finally:
            stop.set()
            for worker in workers:
                worker.join()
    finally:
        control.close()

    inside = [
        (client, sent, received)
        for client, sent, received in recorder.completed
        if window_start <= received <= window_end
    ]
    latencies = [(received - sent) * 1e3 for _, sent, received in inside]
    cycles, cycle_s = 0, 0.0
    for client in range(concurrency):
        answers = sorted(received for who, _, received in inside if who == client)
        if len(answers) >= 2:
            cycles += len(answers) - 1
            cycle_s += answers[-1] - answers[0]
    return LoadResult(
        concurrency=concurrency,
        batch=batch,
        requests=len(latencies),
        window_s=window_end - window_start,
        latencies_ms=latencies,
        errors=recorder.errors,
        first_error=recorder.first_error[1] if recorder.first_error else None,
        server={name: stats_delta(stats_start[name], stats_end[name]) for name in stats_models},
        cycles=cycles,
        cycle_s=cycle_s,
    )
