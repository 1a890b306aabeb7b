"""The gateway row: `safety-checker gateway` in a process of its own, driven as the seed's callers drive it.

Each request is the KServe runtime's body, as SDXL Studio sends it: one image
file, base64 in JSON (`"datatype": "String"`, shape [1, 1]), POSTed to
`/v2/models/safety-checker/infer`. perf_analyzer cannot drive that route (it
asks for the model's metadata first), so the in-house load generator's
closed loops (loadgen.run_clients) do, over one keep-alive HTTP connection per
client, with the files of the `images` row in the same turns. An answer counts
only with a decision in `outputs[0].data`, as the seed's callers read it.

The gateway's own CPU time (/proc) is read at both edges of each window, so a
row says what the gateway costs per image beside what Triton did.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from bench.loadgen import ERROR_BACKOFF_S, LoadResult, Recorder, run_clients, server_counters, server_deltas
from safety_checker_admin.server import free_port
from safety_checker_client import spec

ROOT = Path(__file__).resolve().parent.parent
SEED_ROUTE = "/v2/models/safety-checker/infer"  # the route and model name the seed's callers use
READY_ROUTE = "/v2/health/ready"  # 200 once Triton's images ensemble is ready behind the gateway
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 300.0  # one request at concurrency 8 on the full-size checker: well under this
HEADERS = {"Content-Type": "application/json"}


class GatewayError(RuntimeError):
    """The gateway answered without a decision: its status and the start of what it said."""


def seed_body(image_file: bytes) -> bytes:
    """The seed's request for one file: base64 text in JSON, as SDXL Studio's JSON.stringify writes it."""
    text = base64.b64encode(image_file).decode("ascii")
    body = {"inputs": [{"name": spec.IMAGE.name, "shape": [1, 1], "datatype": "String", "data": [text]}]}
    return json.dumps(body, separators=(",", ":")).encode()


def decision(status: int, answer: bytes) -> bool:
    """The seed's callers' reading of an answer, `outputs[0].data[0]`; GatewayError when there is none."""
    if status != 200:
        raise GatewayError(f"HTTP {status}: {answer[:200].decode(errors='replace')}")
    try:
        value = json.loads(answer)["outputs"][0]["data"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise GatewayError(f"HTTP 200 without outputs[0].data[0]: {answer[:200].decode(errors='replace')}") from None
    if not isinstance(value, bool):
        raise GatewayError(f"HTTP 200 with a decision that is not a boolean: {value!r}")
    return value


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process (Linux /proc), its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


class GatewayProcess:
    """`safety-checker gateway --triton HOST:GRPC_PORT --port PORT`, started and ready, stopped by `close`."""

    def __init__(self, triton_grpc: str, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "safety_checker_client.cli", "gateway", "--triton", triton_grpc]
        command += ["--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        try:
            self._await_ready(timeout_s)
        except BaseException:
            self.close()
            raise

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                said = self.log.read_text()[-2000:]
                raise RuntimeError(f"the gateway exited with {self.process.returncode}:\n{said}")
            try:
                with urllib.request.urlopen(self.url + READY_ROUTE, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or Triton not ready behind it (503)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not ready within {timeout_s:g} s; see {self.log}")
            time.sleep(0.1)

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _client(
    index: int, stop: threading.Event, recorder: Recorder, *, url: str, path: str, bodies: Sequence[bytes]
) -> None:
    """One closed loop over one keep-alive connection: POST, read the decision, POST again, until `stop`; the
    bodies in turn, starting at this client's index. A failed request closes the connection (the next opens
    a new one)."""
    where = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=REQUEST_TIMEOUT_S)
    turn = index
    try:
        while not stop.is_set():
            body = bodies[turn % len(bodies)]
            turn += 1
            sent = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers=HEADERS)
                response = connection.getresponse()
                decision(response.status, response.read())
            except Exception as err:  # an answer without a decision, or the connection failed
                connection.close()
                recorder.failure(time.perf_counter(), err)
                time.sleep(ERROR_BACKOFF_S)
                continue
            recorder.success(index, sent, time.perf_counter())
    finally:
        connection.close()


def measure(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    window_s: float,
    warmup_s: float,
    *,
    path: str = SEED_ROUTE,
    triton_client: Any = None,
    stats_models: Sequence[str] = (),
    gateway_cpu: Optional[Callable[[], float]] = None,
) -> Dict[str, Any]:
    """One window of `concurrency` clients POSTing `bodies` (one image each) in turn to `url` + `path`.

    Returns {"result": LoadResult, "gateway_cpu_s": the gateway's CPU seconds inside the window or None};
    the server statistics of `stats_models` are read through `triton_client` (a tritonclient gRPC client of
    the Triton behind the gateway) at the window's edges, with the gateway's CPU time (`gateway_cpu()`)."""
    if not bodies:
        raise ValueError("no request bodies given")

    def sample() -> Dict[str, Any]:
        counters = server_counters(triton_client, stats_models) if triton_client is not None else {}
        return {"server": counters, "cpu_s": gateway_cpu() if gateway_cpu else None}

    loop = functools.partial(_client, url=url, path=path, bodies=list(bodies))
    run = run_clients(loop, concurrency, window_s, warmup_s, sample)
    result: LoadResult = run.result(concurrency, 1, server_deltas(run.before["server"], run.after["server"]))
    cpu = run.after["cpu_s"] - run.before["cpu_s"] if gateway_cpu else None
    return {"result": result, "gateway_cpu_s": cpu}


def seed_bodies(files: List[bytes]) -> List[bytes]:
    """The seed's request for each file, in order."""
    return [seed_body(data) for data in files]
