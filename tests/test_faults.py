"""Faults under load: a Python-backend stub killed, tritonserver killed or crashed, a stub hung.

Triton 2.51's Python backend does not restart a dead stub, and /v2/health/ready
stays green (finding 2): `safety-checker serve` must notice within 10 s, report
not-ready while it restores the service, and answer again within 60 s. Every
answer given meanwhile must be exactly the one given before the fault (a
request in flight gets an error, never a wrong answer), and a client with a
deadline gets its answer through the restart.
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

from safety_checker_admin import health_probe
from safety_checker_admin.server import Supervisor, TritonServer, child_processes, free_port
from safety_checker_client import spec
from safety_checker_client.client import CheckError, SafetyCheckerClient

pytestmark = [pytest.mark.server, pytest.mark.slow]

COMMAND = str(Path(sys.executable).parent / "safety-checker")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
DETECTION_S = 10
RESTORATION_S = 60


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


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
        (pid,) = [c for c in child_processes(self.process.pid) if "tritonserver" in cmdline(c)]
        return pid

    def stub(self, model: str) -> int:
        (pid,) = [c for c in child_processes(self.tritonserver()) if f"/{model}/1/model.py" in cmdline(c)]
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


def restored_within(served: Served, pixels: np.ndarray, expected, since: float) -> float:
    """Seconds from `since` until a plain request is answered exactly as before; fails after RESTORATION_S."""
    while time.monotonic() - since < RESTORATION_S:
        try:
            if same(infer(f"127.0.0.1:{served.grpc}", pixels), expected):
                return time.monotonic() - since
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not answering {RESTORATION_S} s after the fault; stderr: {served.stderr}")


@pytest.mark.parametrize("model", [spec.EMBEDDER_MODEL, spec.POSTPROCESS_MODEL, spec.NORMALIZE_MODEL])
def test_a_killed_stub_is_noticed_reported_not_ready_and_restored(served, parity_set, model):
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
        with SafetyCheckerClient(f"127.0.0.1:{served.grpc}", deadline_s=RESTORATION_S) as client:
            answer = client.infer(pixels)
        assert same(answer, expected)
        noticed, line = served.wait_for_line("fault:", DETECTION_S)
        assert noticed - killed < DETECTION_S, line
        assert model in line and f"pid {victim}" in line, line
        served.wait_for_line("restored:", RESTORATION_S)
        back = restored_within(served, pixels, expected, killed)
        time.sleep(1.0)  # the load goes on after the restoration
    finally:
        watch.stop()
    assert back < RESTORATION_S
    # Not ready while it could not answer: between the kill and the restoration, readiness failed.
    between = [status for when, status in watch.readiness if killed <= when <= killed + back]
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
    killed = time.monotonic()
    os.kill(first, signal.SIGKILL)
    _, line = served.wait_for_line("fault:", DETECTION_S)
    assert "tritonserver exited" in line
    restored_within(served, pixels, expected, killed)
    assert served.tritonserver() != first
    assert all(gone(stub) for stub in stubs), "the killed server's stubs were left behind"


def test_a_stopped_stub_is_noticed_and_restored(served, parity_set):
    """A stub that no longer runs (SIGSTOP) would hold every request: it counts as a fault too."""
    pixels = parity_set.pixels[:2]
    expected = infer(f"127.0.0.1:{served.grpc}", pixels)
    stopped = time.monotonic()
    stub = served.stub(spec.POSTPROCESS_MODEL)
    os.kill(stub, signal.SIGSTOP)
    noticed, line = served.wait_for_line("fault:", DETECTION_S)
    assert "is stopped" in line and noticed - stopped < DETECTION_S
    restored_within(served, pixels, expected, stopped)
    assert gone(stub), "the stopped stub was left behind"


def test_a_stub_that_stops_during_a_probe_is_named_as_the_fault(repository, monkeypatch):
    """The probe fails because a stub stopped under it, after the process check had passed: the supervisor looks
    at the processes once more and reports the stub, the cause, rather than the probe's timeout."""
    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server.start()
    try:
        (stub,) = [pid for pid, model in server.stubs.items() if model == spec.POSTPROCESS_MODEL]
        probe = health_probe.probe

        def stop_then_probe(*args, **kwargs):
            os.kill(stub, signal.SIGSTOP)
            return probe(*args, **kwargs)

        monkeypatch.setattr(health_probe, "probe", stop_then_probe)
        reports: List[str] = []
        # No restarts allowed: the first fault ends the run, with its reason.
        assert Supervisor(server, probe_interval_s=0, max_restarts=0, report=reports.append).run() == 1
    finally:
        server.kill()
    (report,) = reports
    assert f"the Python-backend stub of {spec.POSTPROCESS_MODEL} (pid {stub}) is stopped" in report, report
    assert gone(stub), "the stopped stub was left behind"


def gone(pid: int, wait_s: float = 10.0) -> bool:
    """Whether process `pid` has ended (a stub left over from a killed server would hold its memory)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
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
    sent = time.monotonic()
    try:
        _HTTP.open(request, timeout=60).read()
    except (urllib.error.URLError, OSError, ConnectionError):
        pass
    restored_within(served, pixels, expected, sent)


def test_the_client_reports_images_unchecked_after_its_deadline(served, parity_set):
    """While the server is down for good, the client retries until its deadline, then raises CheckError."""
    served.stop()
    started = time.monotonic()
    client = SafetyCheckerClient(f"127.0.0.1:{served.grpc}", timeout_s=5, deadline_s=4)
    with pytest.raises(CheckError, match="not checked"):
        client.infer(parity_set.pixels[:1])
    assert client.attempts > 2
    assert time.monotonic() - started < 30
