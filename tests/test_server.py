"""The bundled tritonserver, started for real on throwaway model repositories.

Each repository is built in tmp_path; every server gets free ports so tests
never collide with another server on this host.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import tritonclient.http as httpclient
from fake_clock import FakeClock

from safety_checker_admin import server as server_module
from safety_checker_admin.procfs import child_processes
from safety_checker_admin.serve import serve_forever
from safety_checker_admin.server import READY_POLL_S, ServerError, TritonServer, free_port

pytestmark = pytest.mark.server

CLIENT_DIR = Path(__file__).resolve().parents[1] / "client"

IDENTITY_MODEL = """\
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        # Tells the test which interpreter and numpy the backend stub embeds.
        with open(os.path.join(args["model_repository"], "stub.json"), "w") as f:
            json.dump({"version": sys.version, "prefix": sys.prefix, "numpy": np.__file__}, f)

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", np.array(x, copy=True))]))
        return responses
"""

BROKEN_AT_IMPORT = 'raise ImportError("kaboom at import time")\n'

BROKEN_AT_INITIALIZE = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("kaboom in initialize")

    def execute(self, requests):
        return []
"""


def config(name: str, max_batch_size: int) -> str:
    return f"""\
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


def make_model(repo: Path, name: str, source: str = IDENTITY_MODEL, max_batch_size: int = 8) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config(name, max_batch_size))
    (folder / "1" / "model.py").write_text(source)
    return folder


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server logs and backend dirs go under tmp_path (here and in child Pythons), not /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repository = tmp_path / "repo"
    make_model(repository, "identity")
    return repository


@pytest.fixture
def ports() -> Dict[str, int]:
    """Three distinct free ports (held together while picked, so they cannot coincide)."""
    sockets = []
    for _ in range(3):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    picked = [s.getsockname()[1] for s in sockets]
    for sock in sockets:
        sock.close()
    return dict(zip(("http_port", "grpc_port", "metrics_port"), picked))


def model_config(server: TritonServer, model: str) -> dict:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return client.get_model_config(model)
    finally:
        client.close()


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    return not server_module.port_in_use(host, port)


def connectable(host: str, port: int, wait_s: float = 0.0) -> bool:
    """Whether host:port accepts a connection, trying for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert bindable(port)


def test_start_ready_and_infer(repo: Path, ports: Dict[str, int]) -> None:
    with TritonServer(repo, **ports) as server:
        assert server.running
        assert server.http_url == f"127.0.0.1:{ports['http_port']}"
        assert server.grpc_url == f"127.0.0.1:{ports['grpc_port']}"
        assert server.ready_models() == ["identity"]

        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        tensor = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            assert client.is_server_ready()
            result = client.infer("identity", [tensor])
        finally:
            client.close()  # an open keep-alive connection makes tritonserver wait --exit-timeout-secs on stop
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
        stub = json.loads((repo / "identity" / "stub.json").read_text())
        assert stub == {"version": sys.version, "prefix": sys.prefix, "numpy": np.__file__}
        log_path = server.log_path
    assert not server.running
    assert log_path is not None and log_path.parent == repo.parent
    assert "successfully loaded 'identity'" in log_path.read_text()
    assert all(bindable(p) for p in ports.values())


def test_binds_to_loopback_only_by_default(repo: Path, ports: Dict[str, int]) -> None:
    # All of 127.0.0.0/8 is loopback on Linux: a server bound to 0.0.0.0 would
    # answer on 127.0.0.2 too, one bound to 127.0.0.1 must not.
    with TritonServer(repo, **ports) as server:
        assert server.host == "127.0.0.1"
        for port in ports.values():
            # The metrics endpoint may open a moment after /v2/health/ready answers.
            assert connectable("127.0.0.1", port, wait_s=10)
            assert not connectable("127.0.0.2", port)
        log = server.log_path.read_text()
        assert f"Started HTTPService at 127.0.0.1:{ports['http_port']}" in log
        assert f"Started GRPCInferenceService at 127.0.0.1:{ports['grpc_port']}" in log


@pytest.mark.parametrize("which", ["http_port", "grpc_port", "metrics_port"])
def test_taken_port_fails_fast(repo: Path, ports: Dict[str, int], which: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports[which]))
        blocker.listen()
        server = TritonServer(repo, **ports)
        with pytest.raises(ServerError, match=f"port {ports[which]} .*already in use"):
            server.start()
        assert not server.running
        assert server.log_path is None, "refused before any tritonserver was launched"


def test_port_taken_after_check_is_reported_from_the_log(
    repo: Path, ports: Dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race the pre-check cannot see: the server itself finds the port taken and exits.
    monkeypatch.setattr(server_module, "port_in_use", lambda host, port: False)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports["http_port"]))
        blocker.listen()
        with pytest.raises(ServerError) as caught:
            TritonServer(repo, **ports).start(timeout_s=60)
    message = str(caught.value)
    assert "exited with code" in message
    assert f"127.0.0.1:{ports['http_port']}' already in use" in message


def test_duplicate_ports_rejected(repo: Path) -> None:
    with pytest.raises(ServerError, match="must differ"):
        TritonServer(repo, http_port=9000, grpc_port=9000, metrics_port=9002)


def test_missing_repository(tmp_path: Path, ports: Dict[str, int]) -> None:
    with pytest.raises(ServerError, match="model repository not found"):
        TritonServer(tmp_path / "nowhere", **ports).start()


@pytest.mark.parametrize(
    "source, error",
    [
        (BROKEN_AT_IMPORT, "ImportError: kaboom at import time"),
        (BROKEN_AT_INITIALIZE, "RuntimeError: kaboom in initialize"),
    ],
    ids=["import", "initialize"],
)
def test_model_that_fails_to_load(tmp_path: Path, ports: Dict[str, int], source: str, error: str) -> None:
    repository = tmp_path / "repo"
    make_model(repository, "identity")
    make_model(repository, "broken_model", source)
    server = TritonServer(repository, **ports)
    with pytest.raises(ServerError) as caught:
        server.start(timeout_s=60)
    message = str(caught.value)
    assert "failed to load 'broken_model'" in message
    assert error in message
    assert "\n" not in message
    assert not server.running
    assert all(bindable(p) for p in ports.values())


def test_model_that_never_gets_ready_times_out(tmp_path: Path, ports: Dict[str, int]) -> None:
    """The start-up wait runs on the launcher's clock: here a fake one, so the timeout is counted, not waited."""
    repository = tmp_path / "repo"
    make_model(repository, "sleepy", "import time\ntime.sleep(60)\n")
    clock = FakeClock()
    server = TritonServer(repository, monotonic=clock.monotonic, sleep=clock.sleep, **ports)
    with pytest.raises(ServerError, match="not ready after 3 s"):
        server.start(timeout_s=3)
    assert clock.sleeps == [READY_POLL_S] * int(3 / READY_POLL_S)
    assert not server.running
    assert all(bindable(p) for p in ports.values())


def test_model_config_name_selects_configs_file(repo: Path, ports: Dict[str, int]) -> None:
    (repo / "identity" / "configs").mkdir()
    (repo / "identity" / "configs" / "cpu.pbtxt").write_text(config("identity", 4))

    with TritonServer(repo, **ports) as server:  # model_config_name defaults to "cpu"
        cfg = model_config(server, "identity")
        assert cfg["max_batch_size"] == 4

    with TritonServer(repo, model_config_name=None, **ports) as server:
        cfg = model_config(server, "identity")
        assert cfg["max_batch_size"] == 8


def test_model_config_name_falls_back_to_config_pbtxt(repo: Path, ports: Dict[str, int]) -> None:
    with TritonServer(repo, model_config_name="cpu", **ports) as server:
        cfg = model_config(server, "identity")
        assert cfg["max_batch_size"] == 8


# -- serve_forever ----------------------------------------------------------

SERVE = (
    "import sys; from pathlib import Path; "
    "from safety_checker_admin.serve import serve_forever; "
    "sys.exit(serve_forever(Path(sys.argv[1]), http_port=int(sys.argv[2]), grpc_port=int(sys.argv[3]), "
    "metrics_port=int(sys.argv[4]), host='127.0.0.1', model_config_name='cpu', supervise=sys.argv[5] == 'yes'))"
)


class Serving:
    """`serve_forever` in a child Python, its stdout collected line by line."""

    def __init__(self, repository: Path, ports: Dict[str, int], supervise: bool = True) -> None:
        path = os.pathsep.join(filter(None, [str(CLIENT_DIR), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        args = [str(repository), str(ports["http_port"]), str(ports["grpc_port"]), str(ports["metrics_port"])]
        args.append("yes" if supervise else "no")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE, *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def read_until(self, marker: str, timeout_s: float = 180) -> List[str]:
        seen: List[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            seen.append(line)
            if marker in line:
                return seen
        self.process.kill()
        raise AssertionError(f"no {marker!r} in output {seen}; stderr: {self.process.stderr.read()}")

    def server_pid(self) -> int:
        (child,) = child_processes(self.process.pid)
        return child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_forever_prints_urls_and_stops_on_signal(repo: Path, ports: Dict[str, int], signum: int) -> None:
    serving = Serving(repo, ports)
    output = "".join(serving.read_until("Press Ctrl-C"))
    assert f"http://127.0.0.1:{ports['http_port']}" in output
    assert f"127.0.0.1:{ports['grpc_port']}" in output
    assert f"http://127.0.0.1:{ports['metrics_port']}/metrics" in output
    assert "models:  identity" in output
    assert connectable("127.0.0.1", ports["http_port"])

    serving.process.send_signal(signum)
    assert serving.process.wait(timeout=120) == 0
    assert serving.process.stdout.read() == ""  # nothing streamed after the banner
    assert "Traceback" not in serving.process.stderr.read()
    assert all(bindable(p) for p in ports.values())


def test_serve_forever_reports_server_death(repo: Path, ports: Dict[str, int]) -> None:
    serving = Serving(repo, ports, supervise=False)  # --no-restart: the server's death ends the command
    serving.read_until("Press Ctrl-C")
    os.kill(serving.server_pid(), signal.SIGKILL)
    assert serving.process.wait(timeout=120) != 0
    stderr = serving.process.stderr.read()
    assert "exited on its own" in stderr
    assert "Traceback" not in stderr


def test_serve_forever_error_is_one_line(tmp_path: Path, ports: Dict[str, int], capsys: pytest.CaptureFixture) -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert serve_forever(tmp_path / "nowhere", host="127.0.0.1", model_config_name="cpu", **ports) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model repository not found")
    assert err.count("\n") == 1
    assert signal.getsignal(signal.SIGTERM) is before
