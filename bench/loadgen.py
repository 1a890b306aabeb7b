"""A perf_analyzer-style closed-loop load generator, in Python.

It stays where perf_analyzer does not do the job: image files of assorted
sizes sent raw, as the client sends them, and the gateway's HTTP routes
(perf_analyzer asks for model metadata first; bench/gateway.py). It
reproduces perf_analyzer's concurrency mode closely enough to compare
candidates on one machine: `concurrency` threads (`run_clients`), each with a
connection of its own and exactly one request outstanding at all times (a
synchronous call in a loop), a warm-up, then a fixed measurement window.
Server-side statistics (Triton's statistics extension) are sampled at both
window edges so the report can show what the dynamic batcher did: average
batch size, queueing and compute time per request."""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

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
    # The load generator's own CPU time in the window (its process, every thread): what the client cost.
    client_cpu_s: Optional[float] = None

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
            "client_cpu_s": self.client_cpu_s,
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


class Recorder:
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


Loop = Callable[[int, threading.Event, Recorder], None]  # one client: (its index, stop, where it records)


def _worker(
    index: int,
    stop: threading.Event,
    recorder: Recorder,
    *,
    module,
    url: str,
    model_name: str,
    inputs: Sequence[Inputs],
    outputs: Sequence[str],
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


@dataclass
class Run:
    """What `run_clients` saw: every answer, the window's edges, and what `sample` read at each edge."""

    recorder: Recorder
    window_start: float
    window_end: float
    before: Any
    after: Any
    client_cpu_s: float  # this process's CPU time inside the window: the load generator's own cost

    def result(self, concurrency: int, batch: int, server: Dict[str, Dict[str, Optional[float]]]) -> LoadResult:
        """The answers completed inside the window: their count, latencies, and each client's whole cycles."""
        inside = [
            (client, sent, received)
            for client, sent, received in self.recorder.completed
            if self.window_start <= received <= self.window_end
        ]
        latencies = [(received - sent) * 1e3 for _, sent, received in inside]
        cycles, cycle_s = 0, 0.0
        for client in range(concurrency):
            answers = sorted(received for who, _, received in inside if who == client)
            if len(answers) >= 2:
                cycles += len(answers) - 1
                cycle_s += answers[-1] - answers[0]
        first_error = self.recorder.first_error
        return LoadResult(
            concurrency=concurrency,
            batch=batch,
            requests=len(latencies),
            window_s=self.window_end - self.window_start,
            latencies_ms=latencies,
            errors=self.recorder.errors,
            first_error=first_error[1] if first_error else None,
            server=server,
            cycles=cycles,
            cycle_s=cycle_s,
            client_cpu_s=self.client_cpu_s,
        )


def run_clients(
    loop: Loop,
    concurrency: int,
    window_s: float,
    warmup_s: float,
    sample: Callable[[], Any],
    progress: Optional[Callable[[], None]] = None,
) -> Run:
    """`concurrency` threads each running `loop` (one request outstanding at all times), a warm-up, then one
    window; `sample` is read at both edges of the window (the server's counters, say)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, not {window_s}")
    recorder = Recorder(progress)
    stop = threading.Event()
    threads = [
        threading.Thread(target=loop, name=f"loadgen-{i}", daemon=True, args=(i, stop, recorder))
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(warmup_s)
        before = sample()
        cpu_start, window_start = time.process_time(), time.perf_counter()
        time.sleep(window_s)
        window_end, cpu_end = time.perf_counter(), time.process_time()
        after = sample()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return Run(recorder, window_start, window_end, before, after, cpu_end - cpu_start)


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
    module = triton_module(protocol)
    batch = _batch_of(inputs)
    requests = _requests(inputs)

    control = module.InferenceServerClient(url)
    try:
        outputs = _output_names(control, model_name, protocol)
        loop = functools.partial(
            _worker, module=module, url=url, model_name=model_name, inputs=requests, outputs=outputs
        )
        run = run_clients(
            loop, concurrency, window_s, warmup_s, lambda: server_counters(control, stats_models, protocol), progress
        )
    finally:
        control.close()
    return run.result(concurrency, batch, server_deltas(run.before, run.after))


def server_counters(client, models: Sequence[str], protocol: str = "grpc") -> Dict[str, Dict[str, int]]:
    """`stats_counters` of each of `models`, by name."""
    return {name: stats_counters(client, name, protocol) for name in models}


def server_deltas(
    before: Dict[str, Dict[str, int]], after: Dict[str, Dict[str, int]]
) -> Dict[str, Dict[str, Optional[float]]]:
    """`stats_delta` of each model sampled by `server_counters`."""
    return {name: stats_delta(before[name], after[name]) for name in before}
