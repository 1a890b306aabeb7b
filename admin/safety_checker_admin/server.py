"""Run the tritonserver that ships in the nvidia-pytriton wheel as a child process.

The wheel (`pip install './admin[server]'`) carries a complete
tritonserver 2.51 for CPU hosts: the binary, the Python backend, one backend
stub per Python version and the shared libraries. `TritonServer` wires those
pieces together the way pytriton does, but serves an ordinary model
repository (no pytriton proxy models), so the same repository runs unchanged
in the official Triton container, with the same command line
(command_line.py).

Two things make the Python backend work outside the container:

* The stub (`triton_python_backend_stub`) embeds libpython and lives in the
  backend directory. The wheel keeps one stub per Python version apart, so we
  assemble a private backend directory (a temp dir, removed on stop) holding
  the backend files plus the stub for *this* interpreter; site-packages is
  never modified.
* The embedded interpreter finds its `sys.prefix` by looking up `python3` on
  PATH, so this interpreter's bin directory goes first on PATH (that is how a
  model.py sees the venv's numpy/onnxruntime), and its libpython's directory
  goes on LD_LIBRARY_PATH so the stub loads the same libpython rather than the
  system one (which may be another patch release with another stdlib).

Only this module's caller imports tritonclient; here we speak plain HTTP so
the module stays light (pytriton is located with find_spec, never imported).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from safety_checker_admin import command_line, procfs
from safety_checker_admin.admin_key import ADMIN_KEY_HEADER, check_key, random_key
from safety_checker_admin.errors import ServerError
from safety_checker_admin.server_log import log_errors

# Requests to our own servers (tritonserver, the gateway) must never go through an http(s)_proxy.
LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
STUB_NAME = "triton_python_backend_stub"
# How often start() asks whether the server is ready (and kill() whether its processes have ended).
READY_POLL_S = 0.25
# How long kill() waits for the processes of the server's group to end.
GROUP_EXIT_S = 20.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True if binding host:port would fail, i.e. a server already listens there.

    SO_REUSEADDR is set, as servers do, so TIME_WAIT leftovers of a server
    that just stopped do not count as "in use".
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """ServerError naming the first of `ports` (name -> port) that is given twice or already in use on `host`."""
    if len(set(ports.values())) != len(ports):
        raise ServerError(f"the ports must differ, got {dict(ports)}")
    for name, port in ports.items():
        if port_in_use(host, port):
            raise ServerError(f"{name} port {port} on {host} is already in use")


def _pytriton_dist() -> Tuple[Path, Path]:
    """(the wheel's `tritonserver` folder, its `nvidia_pytriton.libs` folder)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed; install the server extra: pip install './admin[server]'")
    package = Path(list(spec.submodule_search_locations)[0])
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs"


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM tritonserver when we die, so no orphan keeps the ports.

    Linux ties this to the *thread* that started the server: call start() from
    a thread that outlives the server (the main thread, typically).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _backend_directory(dist: Path) -> Path:
    """A private copy of the Python backend with the stub for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    root = Path(tempfile.mkdtemp(prefix="safety-checker-backends-"))
    shutil.copytree(dist / "backends", root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, root / "python" / STUB_NAME)
    return root


def _environment(libs: Path) -> dict:
    env = dict(os.environ)
    lib_dirs = [str(libs)]
    libpython = sysconfig.get_config_var("INSTSONAME")
    libdir = sysconfig.get_config_var("LIBDIR")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and libpython and (Path(libdir) / libpython).exists():
        lib_dirs.append(libdir)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    # Not resolved: a venv's bin/python3 is a symlink, and its folder holds pyvenv.cfg.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    for name, value in command_line.MALLOC_ENVIRONMENT.items():  # an operator's own values win
        env.setdefault(name, value)
    return env


class TritonServer:
    """The bundled tritonserver serving one model repository, as a context manager.

    `start()` returns once `/v2/health/ready` answers 200, which with
    `--strict-readiness` means every model loaded; `stop()` shuts it down.
    Server output goes to `log_path` (request tensors are never logged).
    """

    def __init__(
        self,
        repository: Path,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        model_config_name: Optional[str] = "cpu",
        log_verbose: bool = False,
        arguments: Optional[Sequence[str]] = None,
        wrapper: Sequence[str] = (),
        admin_key: Optional[str] = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`arguments`: run tritonserver with exactly these arguments (a deployment's own command line, e.g. a
        KServe ServingRuntime's) instead of the launcher's; only --backend-directory and the Python backend's
        shared-memory prefix are added, and the ports given here must be the ones in them (they are polled).
        `wrapper`: a command the server runs under (e.g. a mount namespace that puts the repository where those
        arguments expect it).

        `admin_key`: the key that opens the admin APIs; None: a random one, never shown, so that they are
        refused to every caller (`admin_key` tells this process's own callers, e.g. `ready_models`).
        `monotonic`, `sleep`: the clock start() waits by."""
        self.repository = Path(repository).resolve()
        self.host = host
        self.ports = {"HTTP": http_port, "gRPC": grpc_port, "metrics": metrics_port}
        if len(set(self.ports.values())) != 3:
            raise ServerError(f"HTTP, gRPC and metrics ports must differ, got {self.ports}")
        if model_config_name is not None and (not model_config_name or re.search(r"\s", model_config_name)):
            raise ServerError(f"invalid model config name {model_config_name!r} (no spaces allowed)")
        self.model_config_name = model_config_name
        self.log_verbose = log_verbose
        self.arguments = None if arguments is None else list(arguments)
        self.wrapper = list(wrapper)
        self.admin_key = random_key() if admin_key is None else check_key(admin_key)
        self._monotonic, self._sleep = monotonic, sleep
        # The Python backend's shared-memory regions in /dev/shm start with this: a killed server's are removed.
        self.shm_prefix = f"safety_checker_{os.getpid()}_{secrets.token_hex(4)}_"
        self._process: Optional[subprocess.Popen] = None
        self._backend_dir: Optional[Path] = None
        self._log_path: Optional[Path] = None
        self._stubs: Dict[int, str] = {}

    # -- addresses ----------------------------------------------------------
    @property
    def client_host(self) -> str:
        """Where clients connect: loopback when the server binds every interface."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    def _address(self, port: int) -> str:
        host = self.client_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def http_url(self) -> str:
        """HTTP endpoint as tritonclient.http wants it, e.g. "127.0.0.1:8000"."""
        return self._address(self.ports["HTTP"])

    @property
    def grpc_url(self) -> str:
        """gRPC endpoint as tritonclient.grpc wants it, e.g. "127.0.0.1:8001"."""
        return self._address(self.ports["gRPC"])

    @property
    def metrics_url(self) -> str:
        """Prometheus metrics page."""
        return f"http://{self._address(self.ports['metrics'])}/metrics"

    @property
    def log_path(self) -> Optional[Path]:
        """The server's stdout+stderr of the latest start (kept after stop); None before start."""
        return self._log_path

    @property
    def tritonserver_arguments(self) -> List[str]:
        """What tritonserver runs with, but for the backend directory and shared-memory prefix this host adds."""
        if self.arguments is not None:
            return list(self.arguments)
        return command_line.arguments(
            str(self.repository),
            admin_key=self.admin_key,
            model_config_name=self.model_config_name,
            ports=self.ports,
            host=self.host,
            log_verbose="1" if self.log_verbose else "0",
        )

    # -- lifecycle ----------------------------------------------------------
    def _command(self, binary: Path, backends: Path) -> List[str]:
        # What this host adds: where the backends are, and a prefix for the Python backend's shared memory, so
        # that a killed server's is removed.
        shm = f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"
        return [*self.wrapper, str(binary), f"--backend-directory={backends}", shm, *self.tritonserver_arguments]

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        """Launch tritonserver and wait until it is ready; ServerError on any failure."""
        if self.running:
            raise ServerError("tritonserver is already running")
        if self.arguments is None and not self.repository.is_dir():
            raise ServerError(f"model repository not found: {self.repository}")
        check_ports_free(self.host, self.ports)
        dist, libs = _pytriton_dist()
        self._backend_dir = _backend_directory(dist)
        fd, log_name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        self._log_path = Path(log_name)
        try:
            with os.fdopen(fd, "wb") as log:
                self._process = subprocess.Popen(
                    self._command(dist / "bin" / "tritonserver", self._backend_dir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_environment(libs),
                    start_new_session=True,  # Ctrl-C reaches us only; we stop the server in order
                    preexec_fn=die_with_parent,
                )
        except OSError as error:
            self.stop()
            raise ServerError(f"cannot run tritonserver: {error}") from error
        deadline = self._monotonic() + timeout_s
        while self._monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise ServerError(self.failure(f"tritonserver exited with code {code} before it was ready"))
            if self._ready():
                self._stubs = self.stub_processes()
                return self
            self._sleep(READY_POLL_S)
        self.stop()
        raise ServerError(self.failure(f"tritonserver was not ready after {timeout_s:g} s"))

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server, wait up to grace_s, then SIGKILL; remove the private backend dir."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._end_group(process, grace_s)
        self._clean_up()

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (a faulted server: requests in flight get errors, never
        answers), then remove what they leave behind: their shared memory and the private backend dir."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._end_group(process, GROUP_EXIT_S)
        self._clean_up()

    def _end_group(self, process: Optional[subprocess.Popen], timeout_s: float) -> None:
        """SIGKILL what is left of the server's process group once its first process has ended, and wait (at most
        `timeout_s`) until none is alive, as a container's end would: a wrapper (a deployment's entrypoint) that
        exits may leave tritonserver behind, holding the ports."""
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:  # no process of the group is left
            return
        deadline = self._monotonic() + timeout_s
        while procfs.group_members(process.pid) and self._monotonic() < deadline:
            self._sleep(READY_POLL_S)

    def _clean_up(self) -> None:
        for pid in self._stubs:  # a stub whose server died unexpectedly stops on its own; do not wait for it
            try:
                command = procfs.command_line(pid)
                if procfs.process_state(pid) is not None and command and command[0].endswith(STUB_NAME):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self._stubs = {}
        shm = Path("/dev/shm")
        if shm.is_dir():
            for region in shm.glob(f"{self.shm_prefix}*"):
                try:
                    region.unlink()
                except OSError:
                    pass
        if self._backend_dir is not None:
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None

    def wait(self, timeout_s: Optional[float] = None) -> int:
        """Block until the server exits on its own (at most `timeout_s`); returns its exit code."""
        if self._process is None:
            raise ServerError("tritonserver is not running")
        return self._process.wait(timeout_s)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    @property
    def return_code(self) -> Optional[int]:
        """The exit code of the server this object started last, once it has exited; None while it runs."""
        return None if self._process is None else self._process.poll()

    @property
    def stubs(self) -> Dict[int, str]:
        """The Python-backend stubs the server had once ready: pid -> model name."""
        return dict(self._stubs)

    def stub_states(self) -> Dict[int, Tuple[str, Optional[str]]]:
        """The stubs the server had once ready, now: pid -> (model, process state; None once gone)."""
        return {pid: (model, procfs.process_state(pid)) for pid, model in self._stubs.items()}

    def stub_processes(self) -> Dict[int, str]:
        """The server's Python-backend stub processes now: pid -> the model each runs."""
        if not self.running:
            return {}
        found = {}
        for pid in procfs.child_processes(self._process.pid):
            command = procfs.command_line(pid)
            if command and command[0].endswith(STUB_NAME) and len(command) > 1:
                found[pid] = Path(command[1]).parent.parent.name  # .../<model>/<version>/model.py
        return found

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its stubs (a busy server is not a hung one)."""
        pids = ([self._process.pid] if self.running else []) + list(self._stubs)
        return sum(procfs.cpu_seconds(pid) for pid in pids)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.stop()

    # -- HTTP helpers -------------------------------------------------------
    def _ready(self) -> bool:
        try:
            with LOCAL_HTTP.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def ready_models(self) -> List[str]:
        """Names of the models whose state is READY, from the repository index (an admin API: sends the key)."""
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/index",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json", ADMIN_KEY_HEADER: self.admin_key},
        )
        with LOCAL_HTTP.open(request, timeout=10) as response:
            index = json.load(response)
        return sorted({m["name"] for m in index if m.get("state") == "READY"})

    def failure(self, headline: str) -> str:
        """One line: what happened, the errors from the server log, and where the log is."""
        try:
            text = self._log_path.read_text(errors="replace") if self._log_path else ""
        except OSError:
            text = ""
        errors = log_errors(text)
        detail = f": {'; '.join(errors)}" if errors else ""
        return f"{headline}{detail} (log: {self._log_path})"
