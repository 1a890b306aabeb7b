"""Real faults through a real tritonserver: a Python-backend stub killed or stopped, tritonserver killed or crashed.

Triton 2.51's Python backend does not restart a dead stub, and /v2/health/ready
stays green (finding 2): `safety-checker serve` must notice, report not-ready
while it restores the service, and answer again. Every answer given meanwhile
must be exactly the one given before the fault (a request in flight gets an
error, never a wrong answer), and a client with a deadline gets its answer
through the restart. How soon (noticed within 10 s, answering within 60 s) is
a wall-clock bound: `make soak` checks it (bench/soak.py), and
tests/test_supervisor.py counts the supervisor's probes and restarts on a fake
clock.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from fake_clock import FakeClock

from safety_checker_admin.probe import load_health_probe
from safety_checker_admin.procfs import child_processes, process_state, running
from safety_checker_admin.server import TritonServer, free_port
from safety_checker_admin.supervisor import Supervisor
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.errors import CheckError

pytestmark = [pytest.mark.server, pytest.mark.slow]

COMMAND = str(Path(sys.executable).parent / "safety-checker")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# How long a test waits for what must come (a bound on a hung test, not a measure: make soak measures).
WAIT_S = 300


class Served:
    """`safety-checker serve` in its own process group, its stderr read line by line with the time of each."""

    def __init__(self, repository: Path, *extra: str) -> None:
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.process = subprocess.Popen(
            [
                COMMAND,
                "serve",
                "--repository",
                str(repository),
                "--http-port",
                str(self.http),
                "--grpc-port",
                str(self.grpc),
                "--metrics-port",
                str(self.metrics),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.errors: queue.Queue[Tuple[float, str]] = queue.Queue()
        self.stderr: List[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        banner = []
        deadline = time.monotonic() + 300
        for line in self.process.stdout:
            banner.append(line)
            if "Press Ctrl-C" in line or time.monotonic() > deadline:
                break
        assert any("Press Ctrl-C" in line for line in banner), (banner, self.stderr)
        self.banner = "".join(banner)

    def _pump(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.errors.put((time.monotonic(), line))

    def wait_for_line(self, fragment: str, timeout_s: float) -> Tuple[float, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                when, line = self.errors.get(timeout=0.2)
            except queue.Empty:
                continue
            if fragment in line:
                return when, line
        raise AssertionError(f"no {fragment!r} on stderr within {timeout_s} s: {self.stderr}")

    def tritonserver(self) -> int:
        (pid,) = running(child_processes(self.process.pid), "tritonserver")
        return pid

    def stub(self, model: str) -> int:
        (pid,) = running(child_processes(self.tritonserver()), f"/{model}/1/model.py")
        return pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def served(repository):
    started = Served(repository)
    yield started
    started.stop()


def ready(port: int) -> object:
    try:
        with _HTTP.open(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError) as error:
        return type(error).__name__


def infer(url: str, pixels: np.ndarray) -> Dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput(spec.PIXEL_VALUES.name, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        outputs = [grpcclient.InferRequestedOutput(t.name) for t in spec.ENSEMBLE_OUTPUTS]
        result = client.infer(spec.ENSEMBLE_MODEL, [tensor], outputs=outputs, client_timeout=30)
    finally:
        client.close()
    return {t.name: result.as_numpy(t.name) for t in spec.ENSEMBLE_OUTPUTS}


def same(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> bool:
    return all(a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]) for name in b)


class Watch:
    """Load (plain requests, no retries) and readiness polls running beside a fault, until stopped."""

    def __init__(self, served: Served, pixels: np.ndarray, expected: Dict[str, np.ndarray], threads: int = 3):
        self.served, self.pixels, self.expected = served, pixels, expected
        self.answers, self.errors, self.wrong = 0, [], 0
        self.readiness: List[Tuple[float, object]] = []
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._load) for _ in range(threads)]
        self.threads.append(threading.Thread(target=self._poll))
        for thread in self.threads:
            thread.start()

    def _load(self) -> None:
        url = f"127.0.0.1:{self.served.grpc}"
        while not self.stop_flag.is_set():
            try:
                got = infer(url, self.pixels)
            except Exception as error:
                self.errors.append(str(error))
                time.sleep(0.05)
                continue
            self.answers += 1
            self.wrong += not same(got, self.expected)

    def _poll(self) -> None:
        while not self.stop_flag.is_set():
            self.readiness.append((time.monotonic(), ready(self.served.http)))
            time.sleep(0.1)

    def stop(self) -> None:
        self.stop_flag.set()
        for thread in self.threads:
            thread.join()


def restored(served: Served, pixels: np.ndarray, expected) -> float:
    """When (time.monotonic()) a plain request was first answered exactly as before."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if same(infer(f"127.0.0.1:{served.grpc}", pixels), expected):
                return time.monotonic()
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not answering again; stderr: {served.stderr}")


def test_a_killed_stub_is_noticed_reported_not_ready_and_restored(served, parity_set):
    """The embedder's stub, as make soak kills it; the supervisor judges every stub alike (test_supervisor.py)."""
    model = spec.EMBEDDER_MODEL
    pixels = parity_set.pixels[:3]
    expected = infer(f"127.0.0.1:{served.grpc}", pixels)
    assert ready(served.http) == 200
    watch = Watch(served, pixels, expected)
    try:
        time.sleep(1.0)
        victim = served.stub(model)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # A client that retries (the default deadline) gets its answer through the restart.
        with SafetyCheckerClient(f"127.0.0.1:{served.grpc}", deadline_s=WAIT_S) as client:
            answer = client.infer(pixels)
        assert same(answer, expected)
        _, line = served.wait_for_line("fault:", WAIT_S)
        assert model in line and f"pid {victim}" in line, line
        served.wait_for_line("restored:", WAIT_S)
        back = restored(served, pixels, expected)
        time.sleep(1.0)  # the load goes on after the restoration
    finally:
        watch.stop()
    # Not ready while it could not answer: between the kill and the restoration, readiness failed.
    between = [status for when, status in watch.readiness if killed <= when <= back]
    assert any(status != 200 for status in between), between
    assert watch.readiness[-1][1] == 200
    # Requests in flight got errors, never answers other than the one before the fault.
    assert watch.wrong == 0 and watch.answers > 0
    assert served.tritonserver() and ready(served.http) == 200


def test_a_killed_tritonserver_is_restarted(served, parity_set):
    pixels = parity_set.pixels[:2]
    expected = infer(f"127.0.0.1:{served.grpc}", pixels)
    first = served.tritonserver()
    stubs = child_processes(first)
    os.kill(first, signal.SIGKILL)
    _, line = served.wait_for_line("fault:", WAIT_S)
    assert "tritonserver exited" in line
    restored(served, pixels, expected)
    assert served.tritonserver() != first
    assert all(gone(stub) for stub in stubs), "the killed server's stubs were left behind"


def test_a_stub_that_stops_during_a_probe_is_named_as_the_fault(repository):
    """The probe fails because a stub stopped under it, after the process check had passed: the supervisor looks
    at the processes once more and reports the stub, the cause, rather than the probe's timeout."""
    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    try:
        (stub,) = [pid for pid, model in server.stubs.items() if model == spec.POSTPROCESS_MODEL]
        probe = load_health_probe(repository).probe

        def stop_then_probe(*args):
            os.kill(stub, signal.SIGSTOP)
            return probe(*args)

        reports: List[str] = []
        # No restarts allowed: the first fault ends the run, with its reason.
        supervisor = Supervisor(
            server, probe_interval_s=0, max_restarts=0, report=reports.append, probe=stop_then_probe
        )
        assert supervisor.run() == 1
    finally:
        server.kill()
    (report,) = reports
    assert f"the Python-backend stub of {spec.POSTPROCESS_MODEL} (pid {stub}) is stopped" in report, report
    assert gone(stub), "the stopped stub was left behind"


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a stub left over from a killed server would hold its memory)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process_state(pid) in (None, "Z"):
            return True
        time.sleep(0.2)
    return False


def test_a_form_encoded_upload_that_crashes_tritonserver_is_survived(served, parity_set):
    """Triton 2.51's HTTP front end dies (SIGSEGV) on a body of about 4 MB sent as
    application/x-www-form-urlencoded, what `curl --data-binary` sends by default: the supervisor restores the
    service (should a later Triton survive it, the request is merely answered)."""
    pixels = parity_set.pixels[:2]
    expected = infer(f"127.0.0.1:{served.grpc}", pixels)
    batch = np.zeros((8, 3, 224, 224), np.float32)
    header = (
        '{"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [8, 3, 224, 224], '
        f'"parameters": {{"binary_data_size": {batch.nbytes}}}}}]}}'
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{served.http}/v2/models/{spec.ENSEMBLE_MODEL}/infer",
        data=header + batch.tobytes(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    try:
        _HTTP.open(request, timeout=60).read()
    except (urllib.error.URLError, OSError, ConnectionError):
        pass
    restored(served, pixels, expected)


def test_the_client_reports_images_unchecked_after_its_deadline(parity_set):
    """While the server is down for good (nothing listens), the client retries until its deadline, then raises
    CheckError; its retries wait on a fake clock here, so the deadline is counted, not waited for."""
    clock = FakeClock()
    client = SafetyCheckerClient(
        f"127.0.0.1:{free_port()}", timeout_s=5, deadline_s=4, monotonic=clock.monotonic, sleep=clock.sleep
    )
    with pytest.raises(CheckError, match="not checked"):
        client.infer(parity_set.pixels[:1])
    assert client.attempts > 2 and client.attempts == len(clock.sleeps) + 1
    assert sum(clock.sleeps) <= 4
