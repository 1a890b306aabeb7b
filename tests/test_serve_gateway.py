"""`safety-checker serve --gateway-port`: the gateway beside the bundled server, for real and on a fake clock.

A real `safety-checker serve` (the command, in a child process) on the suite's
exported tiny checker: the seed's body to the gateway's port gets Triton's own
decision in the KServe runtime's answer, the health routes answer, the key
file is passed on, a killed gateway is restarted by the supervisor, and a
signal stops both. Without the gateway package, `serve` refuses before any
server starts. The supervisor's bookkeeping of gateway restarts is counted
on fake processes and a fake clock.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from fake_clock import FakeClock
from gateway_fixtures import studio_body
from test_supervisor import FakeServer, Probe

import safety_checker_admin.server as launcher
from safety_checker_admin.errors import ServerError
from safety_checker_admin.procfs import child_processes, command_line
from safety_checker_admin.serve import serve_forever
from safety_checker_admin.supervisor import Supervisor
from safety_checker_client import spec

INFER = "/v2/models/safety-checker/infer"
KEY = "serve-gateway-key-0123456789"


class Command:
    """A command in a child process, its stdout and stderr collected line by line."""

    def __init__(self, argv: List[str], env: dict) -> None:
        self.process = subprocess.Popen(argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=lambda s=stream, q=lines: [q.put(line) for line in s], daemon=True).start()

    def read_until(self, lines: queue.Queue, marker: str, timeout_s: float = 300) -> str:
        seen: List[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=0.2))
            except queue.Empty:
                if self.process.poll() is not None and lines.empty():
                    break
                continue
            if marker in seen[-1]:
                return "".join(seen)
        self.process.kill()
        raise AssertionError(f"no {marker!r} in {seen}")


def triton_decisions(grpc_url: str, files: List[bytes]) -> List[bool]:
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        batch = np.array(files, dtype=object).reshape(-1, 1)
        tensor = grpcclient.InferInput(spec.IMAGE.name, list(batch.shape), "BYTES")
        tensor.set_data_from_numpy(batch)
        answer = client.infer(spec.IMAGES_MODEL, [tensor]).as_numpy(spec.HAS_NSFW_CONCEPTS.name)
        return [bool(v) for v in answer.reshape(-1)]
    finally:
        client.close()


def gateway_pid(serve_pid: int) -> int:
    (pid,) = [p for p in child_processes(serve_pid) if "gateway" in (command_line(p) or [])]
    return pid


def bindable(port: int) -> bool:
    return not launcher.port_in_use("127.0.0.1", port)


@pytest.mark.server
def test_serve_starts_the_gateway_beside_the_server_and_stops_both(repository, encoded_files, tmp_path):
    http, grpc, metrics, port = (launcher.free_port() for _ in range(4))
    key_file = tmp_path / "gateway-key"
    key_file.write_text(KEY + "\n")
    command = [sys.executable, "-m", "safety_checker_client.cli", "serve", "--repository", str(repository)]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    command += ["--gateway-port", str(port), "--gateway-api-key-file", str(key_file)]
    serving = Command(command, dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        banner = serving.read_until(serving.out, "Press Ctrl-C")
        url = f"http://127.0.0.1:{port}"
        assert f"gateway: {url} " in banner and str(key_file) in banner, banner

        assert requests.get(url + "/v2/health/live", timeout=30).json() == {"live": True}
        assert requests.get(url + "/v2/health/ready", timeout=30).json() == {"ready": True}
        ready = requests.get(url + "/v2/models/safety-checker/ready", timeout=30)
        assert (ready.status_code, ready.json()) == (200, {"name": "safety-checker", "ready": True})

        names = sorted(n for n in encoded_files if n.endswith(".png") and not n.startswith(("animated", "hidden")))
        files = [encoded_files[n].read_bytes() for n in names]
        expected = triton_decisions(f"127.0.0.1:{grpc}", files)

        def seed(data: bytes, key: str = KEY) -> requests.Response:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            return requests.post(url + INFER, data=studio_body(base64.b64encode(data).decode()), headers=headers)

        assert seed(files[0], key="wrong").status_code == 401  # the key file reached the gateway
        for data, decision in zip(files, expected):
            response = seed(data)
            assert response.status_code == 200, response.text
            assert response.json()["outputs"][0]["data"] == [decision]

        # A gateway that dies is restarted by the supervisor; tritonserver is left alone.
        server_pids = [p for p in child_processes(serving.process.pid) if p != gateway_pid(serving.process.pid)]
        os.kill(gateway_pid(serving.process.pid), signal.SIGKILL)
        restored = serving.read_until(serving.err, "restored: the gateway answers again", timeout_s=120)
        assert "fault: the gateway exited with code -9; restarting the gateway" in restored, restored
        assert seed(files[0]).json()["outputs"][0]["data"] == [expected[0]]
        assert set(server_pids) <= set(child_processes(serving.process.pid))

        serving.process.send_signal(signal.SIGTERM)
        assert serving.process.wait(timeout=120) == 0
    finally:
        if serving.process.poll() is None:
            serving.process.kill()
    assert serving.out.empty()  # nothing printed after the banner
    stderr = "".join(serving.err.queue)  # what read_until did not take
    assert "Traceback" not in stderr and KEY not in stderr, stderr
    assert all(bindable(p) for p in (http, grpc, metrics, port))


def test_serve_refuses_a_gateway_port_without_the_gateway_package(tmp_path, monkeypatch, capsys):
    """The admin package never imports the gateway; asked for one it cannot find, `serve` says what to install and
    starts no tritonserver (this test is not marked `server`: a start would fail it)."""
    monkeypatch.setitem(sys.modules, "safety_checker_gateway", None)  # importlib finds no such package
    tmp_path.joinpath("repo").mkdir()
    assert serve_forever(tmp_path / "repo", gateway_port=launcher.free_port(), model_config_name="cpu") == 1
    err = capsys.readouterr().err
    assert err == "error: --gateway-port needs the gateway, which is not installed: pip install ./gateway\n"


def test_the_admin_package_imports_without_the_gateway():
    code = (
        "import sys; sys.modules['safety_checker_gateway'] = None; "
        "import safety_checker_admin.serve, safety_checker_admin.commands, safety_checker_admin.supervisor; "
        "print('imported')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "imported\n"), done.stderr


def test_gateway_api_key_file_needs_a_gateway_port(tmp_path):
    command = [sys.executable, "-m", "safety_checker_client.cli", "serve", "--repository", str(tmp_path)]
    done = subprocess.run(command + ["--gateway-api-key-file", str(tmp_path / "key")], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, "error: --gateway-api-key-file needs --gateway-port\n")


# -- the supervisor's bookkeeping, on fakes ------------------------------------------------------------------


class FakeGateway:
    """What the supervisor asks of a GatewayProcess, with counts of stops and starts."""

    def __init__(self, start_failures: int = 0) -> None:
        self.running, self.return_code = True, None
        self.log_path = Path("gateway.log")
        self.stops, self.starts, self.start_failures = 0, 0, start_failures

    def exit(self, code: int) -> None:
        self.running, self.return_code = False, code

    def stop(self) -> None:
        self.stops += 1

    def start(self) -> FakeGateway:
        self.starts += 1
        if self.start_failures:
            self.start_failures -= 1
            raise ServerError("the gateway exited with code 2: error: the API key file k is empty")
        self.running, self.return_code = True, None
        return self


def watched(tmp_path: Path, gateway: FakeGateway, clock: FakeClock, reports: List[str]):
    server = FakeServer(tmp_path)
    supervisor = Supervisor(
        server,
        report=reports.append,
        probe=Probe(clock),
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        gateway=gateway,
    )
    return server, supervisor


def test_a_gateway_that_exits_is_restarted_and_the_server_left_alone(tmp_path):
    clock, reports, gateway = FakeClock(until=60.0), [], FakeGateway()
    server, supervisor = watched(tmp_path, gateway, clock, reports)
    clock.at(10.0, lambda: gateway.exit(-9))
    with pytest.raises(KeyboardInterrupt):
        supervisor.run()
    assert (gateway.stops, gateway.starts) == (1, 1)
    assert (server.kills, server.starts) == (0, 0)
    assert reports == [
        "fault: the gateway exited with code -9; restarting the gateway",
        "restored: the gateway answers again (log: gateway.log)",
    ]


def test_a_gateway_that_cannot_start_again_ends_the_watch(tmp_path):
    clock, reports, gateway = FakeClock(until=3600.0), [], FakeGateway(start_failures=99)
    server, supervisor = watched(tmp_path, gateway, clock, reports)
    clock.at(1.0, lambda: gateway.exit(1))
    assert supervisor.run() == 1
    assert gateway.starts == supervisor.max_restarts
    assert server.kills == 0
    assert reports[-1].startswith("error: the gateway's restart failed: the gateway exited with code 2")
    assert reports[-1].endswith(f"{supervisor.max_restarts} restarts within 600 s did not cure it, giving up")
    assert json.dumps(reports).count("restarting the gateway") == supervisor.max_restarts
