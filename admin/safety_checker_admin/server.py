"""Run the tritonserver that ships in the nvidia-pytriton wheel as a child process.

The wheel (`pip install './admin[server]'`) carries a complete
tritonserver 2.51 for CPU hosts: the binary, the Python backend, one backend
stub per Python version and the shared libraries. `TritonServer` wires those
pieces together the way pytriton does, but serves an ordinary model
repository (no pytriton proxy models), so the same repository runs unchanged
in the official Triton container.

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

The admin APIs (model repository, logging, trace, shared memory) are
restricted with `--http-restricted-api` / `--grpc-restricted-protocol` to
callers that send the operator's key (header `admin-key`, gRPC metadata
`triton-grpc-protocol-admin-key`); without one, a random key that is never
shown is used, so those calls are refused outright. Inference, health,
metadata and statistics stay open.

`Supervisor` keeps a started server answering (`safety-checker serve`): the
Python backend of Triton 24.x does not restart a dead stub, and health stays
green, so it watches the stubs and sends a real tiny inference
(health_probe.py) every few seconds, and restarts tritonserver when either
fails.

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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

from safety_checker_admin import health_probe

# Requests to our own server must never go through an http(s)_proxy.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Triton log lines that are errors but only say "no GPU here"; hidden from messages.
_NOISE = ("CudaDriverHelper", "NVML", "DCGM")
_LOG_PREFIX = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")

# The admin APIs, restricted to callers with the key; inference, health, metadata and statistics stay open.
ADMIN_APIS = ("model-repository", "logging", "trace", "shared-memory")
ADMIN_KEY_HEADER = "admin-key"
# Over gRPC Triton expects the restricted-protocol header under this prefix.
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
# Where `safety-checker serve` reads the operator's key when no --admin-key-file is given.
ADMIN_KEY_ENV = "SAFETY_CHECKER_ADMIN_KEY"
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.~+/-]{16,256}$")

# glibc malloc settings for tritonserver and its stubs (an operator's own values win): every allocation of
# 32 KB or more (gRPC's receive buffers, request tensors) is mmapped and so handed back to the system when
# freed, instead of staying in a heap arena that only grows; few arenas for Triton's many threads. Measured
# with 64 clients sending 32-image requests: without these, tritonserver kept 0.9 GB after the load
# (docs/robustness.md).
MALLOC_ENVIRONMENT = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": "32768",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}
# gRPC request/response objects kept for reuse: none, since each keeps the capacity of the largest request it
# held (19 MB for 32 images) for as long as the server runs.
GRPC_ALLOCATION_POOL = 0
STUB_NAME = "triton_python_backend_stub"


def admin_restriction(key: str) -> str:
    """The value of --http-restricted-api and --grpc-restricted-protocol (Triton 2.51: <apis>:<header>=<key>)."""
    if not _KEY_PATTERN.match(key):
        raise ServerError(
            "the admin key must be 16-256 letters, digits or any of _ . ~ + / - "
            "(e.g. the output of `openssl rand -hex 32`)"
        )
    return f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={key}"


class ServerError(RuntimeError):
    """tritonserver could not start or stopped serving; the message says why.

    Raised instead of hanging: a taken port, a missing repository, a model
    that fails to load (its error from the server log is in the message) or
    a start-up timeout.
    """


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
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


def _pytriton_dist() -> Tuple[Path, Path]:
    """(the wheel's `tritonserver` folder, its `nvidia_pytriton.libs` folder)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed; install the server extra: pip install './admin[server]'")
    package = Path(list(spec.submodule_search_locations)[0])
    return package / "tritonserver", package.parent / "nvidia_pytriton.libs"


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM tritonserver when we die, so no orphan keeps the ports.

    Linux ties this to the *thread* that started the server: call start() from
    a thread that outlives the server (the main thread, typically).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_processes(pid: int) -> List[int]:
    """The child processes of `pid` (of every one of its threads), from /proc."""
    found: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def _cmdline(pid: int) -> List[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _stat_fields(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat after the command name (field 3, the state, first); None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _process_state(pid: int) -> Optional[str]:
    """R, S, D, T (stopped), t (traced), Z (zombie), ...; None when the process is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _log_errors(text: str, limit: int = 6) -> List[str]:
    """The error lines of a tritonserver log, without timestamps and GPU-absence noise.

    A model load failure appears as one E line ("failed to load 'NAME' version
    1: Internal: RuntimeError: ...") whose traceback is escaped as literal
    "\\n"; we keep what comes before the traceback.
    """
    found: List[str] = []
    for line in text.splitlines():
        if not (line.startswith("E") and _LOG_PREFIX.match(line)) and not line.startswith("error:"):
            continue
        if any(noise in line for noise in _NOISE):
            continue
        message = _LOG_PREFIX.sub("", line).strip().strip('"').split("\\n")[0].strip()
        if message and message not in found:
            found.append(message)
    return found[:limit]


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
    ) -> None:
        """`arguments`: run tritonserver with exactly these arguments (a deployment's own command line, e.g. a
        KServe ServingRuntime's) instead of the launcher's; only --backend-directory and the Python backend's
        shared-memory prefix are added, and the ports
        given here must be the ones in them (they are polled). `wrapper`: a command the server runs under
        (e.g. a mount namespace that puts the repository where those arguments expect it).

        `admin_key`: the key that opens the admin APIs; None: a random one, never shown, so that they are
        refused to every caller (`admin_key` tells this process's own callers, e.g. `ready_models`)."""
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
        self.admin_key = secrets.token_hex(32) if admin_key is None else admin_key
        self._restriction = admin_restriction(self.admin_key)
        # The Python backend's shared-memory regions in /dev/shm start with this: a killed server's are removed.
        self.shm_prefix = f"safety_checker_{os.getpid()}_{secrets.token_hex(4)}_"
        self._shm_option = f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"
        self._process: Optional[subprocess.Popen] = None
        self._backend_dir: Optional[Path] = None
        self._log_path: Optional[Path] = None
        self._stubs: Dict[int, str] = {}

    # -- addresses ----------------------------------------------------------
    @property
    def _client_host(self) -> str:
        """Where clients connect: loopback when the server binds every interface."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    def _address(self, port: int) -> str:
        host = self._client_host
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

    # -- lifecycle ----------------------------------------------------------
    def _backend_directory(self, dist: Path) -> Path:
        """A private copy of the Python backend with the stub for this interpreter."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
        root = Path(tempfile.mkdtemp(prefix="safety-checker-backends-"))
        shutil.copytree(dist / "backends", root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, root / "python" / "triton_python_backend_stub")
        return root

    def _environment(self, libs: Path) -> dict:
        env = dict(os.environ)
        lib_dirs = [str(libs)]
        libpython = sysconfig.get_config_var("INSTSONAME")
        libdir = sysconfig.get_config_var("LIBDIR")
        if (
            sysconfig.get_config_var("Py_ENABLE_SHARED")
            and libdir
            and libpython
            and (Path(libdir) / libpython).exists()
        ):
            lib_dirs.append(libdir)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        # Not resolved: a venv's bin/python3 is a symlink, and its folder holds pyvenv.cfg.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        for name, value in MALLOC_ENVIRONMENT.items():
            env.setdefault(name, value)
        return env

    def _command(self, binary: Path, backends: Path) -> List[str]:
        if self.arguments is not None:
            # What a host adds to a deployment's own command line: where the backends are, and a prefix for the
            # Python backend's shared memory, so that a killed server's is removed.
            return [*self.wrapper, str(binary), f"--backend-directory={backends}", self._shm_option, *self.arguments]
        cmd = [
            *self.wrapper,
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.ports['HTTP']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['gRPC']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--exit-on-error=true",  # a model that fails to load stops the server: we see it at once
            "--strict-readiness=true",  # ready only when every model is
            "--model-control-mode=none",  # models load at start-up and cannot be loaded or unloaded over the API
            # How long SIGTERM waits for in-flight requests -- and for idle keep-alive
            # client connections, which otherwise hold shutdown for the default 30 s.
            "--exit-timeout-secs=10",
            f"--grpc-infer-allocation-pool-size={GRPC_ALLOCATION_POOL}",
            f"--http-restricted-api={self._restriction}",
            f"--grpc-restricted-protocol={self._restriction}",
            self._shm_option,
        ]
        if self.model_config_name is not None:
            cmd.append(f"--model-config-name={self.model_config_name}")
        if self.log_verbose:
            cmd.append("--log-verbose=1")
        return cmd

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        """Launch tritonserver and wait until it is ready; ServerError on any failure."""
        if self.running:
            raise ServerError("tritonserver is already running")
        if self.arguments is None and not self.repository.is_dir():
            raise ServerError(f"model repository not found: {self.repository}")
        for name, port in self.ports.items():
            if _port_in_use(self.host, port):
                raise ServerError(f"{name} port {port} on {self.host} is already in use")
        dist, libs = _pytriton_dist()
        self._backend_dir = self._backend_directory(dist)
        fd, log_name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        self._log_path = Path(log_name)
        try:
            with os.fdopen(fd, "wb") as log:
                self._process = subprocess.Popen(
                    self._command(dist / "bin" / "tritonserver", self._backend_dir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(libs),
                    start_new_session=True,  # Ctrl-C reaches us only; we stop the server in order
                    preexec_fn=_die_with_parent,
                )
        except OSError as error:
            self.stop()
            raise ServerError(f"cannot run tritonserver: {error}") from error
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise ServerError(self._failure(f"tritonserver exited with code {code} before it was ready"))
            if self._ready():
                self._stubs = self.stub_processes()
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerError(self._failure(f"tritonserver was not ready after {timeout_s:g} s"))

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
        self._clean_up()

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (a faulted server: requests in flight get errors, never
        answers), then remove what they leave behind: their shared memory and the private backend dir."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._clean_up()

    def _clean_up(self) -> None:
        for pid in self._stubs:  # a stub whose server died unexpectedly stops on its own; do not wait for it
            try:
                command = _cmdline(pid)
                if _process_state(pid) is not None and command and command[0].endswith(STUB_NAME):
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

    def wait(self) -> int:
        """Block until the server exits on its own; returns its exit code."""
        if self._process is None:
            raise ServerError("tritonserver is not running")
        return self._process.wait()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    @property
    def stubs(self) -> Dict[int, str]:
        """The Python-backend stubs the server had once ready: pid -> model name."""
        return dict(self._stubs)

    def stub_processes(self) -> Dict[int, str]:
        """The server's Python-backend stub processes now: pid -> the model each runs."""
        if not self.running:
            return {}
        found = {}
        for pid in child_processes(self._process.pid):
            command = _cmdline(pid)
            if command and command[0].endswith(STUB_NAME) and len(command) > 1:
                found[pid] = Path(command[1]).parent.parent.name  # .../<model>/<version>/model.py
        return found

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and its stubs (a busy server is not a hung one)."""
        pids = ([self._process.pid] if self.running else []) + list(self._stubs)
        return sum(_cpu_seconds(pid) for pid in pids)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.stop()

    # -- HTTP helpers -------------------------------------------------------
    def _ready(self) -> bool:
        try:
            with _HTTP.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
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
        with _HTTP.open(request, timeout=10) as response:
            index = json.load(response)
        return sorted({m["name"] for m in index if m.get("state") == "READY"})

    def _failure(self, headline: str) -> str:
        """One line: what happened, the errors from the server log, and where the log is."""
        try:
            text = self._log_path.read_text(errors="replace") if self._log_path else ""
        except OSError:
            text = ""
        errors = _log_errors(text)
        detail = f": {'; '.join(errors)}" if errors else ""
        return f"{headline}{detail} (log: {self._log_path})"


class Supervisor:
    """Keeps a started `TritonServer` answering, and restarts it when it cannot.

    Triton 2.51's Python backend does not restart a dead stub and its health
    endpoints stay green, so the supervisor looks for itself:

    * every `poll_s`: tritonserver has exited, or a Python-backend stub it had
      when it got ready is gone, a zombie or stopped;
    * every `probe_interval_s`: one real tiny inference through the checker
      (health_probe.py, at priority 1 so that it never waits behind the
      queue). An error answer is a fault; no answer within `probe_timeout_s`
      (or Triton's 503) is one only if the server and its stubs used no CPU
      meanwhile: a busy server is not a hung one.

    A fault is answered at once: tritonserver and its stubs are killed
    (requests in flight get errors, never answers, and clients retry), their
    shared memory is removed, and a new tritonserver is started. From the kill
    until the new server is ready nothing listens on its ports, so every
    health check, /v2/health/ready included, fails: not-ready. More than
    `max_restarts` restarts within `restart_window_s` means a fault a restart
    does not cure (a model that no longer loads): the supervisor gives up.
    """

    def __init__(
        self,
        server: TritonServer,
        *,
        poll_s: float = 0.5,
        probe_interval_s: float = 2.0,
        probe_timeout_s: float = 5.0,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
        start_timeout_s: float = 180.0,
        report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    ) -> None:
        self.server = server
        self.poll_s = poll_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.start_timeout_s = start_timeout_s
        self.report = report
        # Only a repository with the checker's uint8 ensemble can be probed; any other gets the process checks.
        probed = server.arguments is not None or (server.repository / health_probe.PROBE_MODEL).is_dir()
        self.probe_model: Optional[str] = health_probe.PROBE_MODEL if probed else None
        self._restarts: List[float] = []

    # -- detection --------------------------------------------------------------
    def process_fault(self) -> Optional[str]:
        """Why the server cannot answer, judged from its processes; None when they look healthy."""
        if not self.server.running:
            code = None if self.server._process is None else self.server._process.returncode
            return f"tritonserver exited with code {code}"
        for pid, model in self.server.stubs.items():
            state = _process_state(pid)
            if state is None or state == "Z":
                return f"the Python-backend stub of {model} (pid {pid}) died"
            if state in ("T", "t"):
                return f"the Python-backend stub of {model} (pid {pid}) is stopped"
        return None

    def probe_fault(self, timeout_s: Optional[float] = None) -> Optional[str]:
        """Why one real inference did not come back; None when it did, or when the server is merely busy."""
        if self.probe_model is None:
            return None
        timeout_s = self.probe_timeout_s if timeout_s is None else timeout_s
        host, port = self.server._client_host, self.server.ports["HTTP"]
        cpu, started = self.server.cpu_seconds(), time.monotonic()
        status, message = health_probe.probe(host, port, timeout_s, self.probe_model)
        if status == health_probe.OK:
            return None
        if status in (health_probe.UNAVAILABLE, health_probe.TIMEOUT):
            busy = self.server.cpu_seconds() - cpu
            if busy > 0.1 * (time.monotonic() - started):
                return None  # working through a batch: overloaded, not hung
        return f"health probe: {message}"

    # -- restoration --------------------------------------------------------------
    def restart(self, reason: str) -> bool:
        """Kill and start the server again; False once restarts no longer help."""
        while True:
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < self.restart_window_s]
            if len(self._restarts) >= self.max_restarts:
                self.report(
                    f"error: {reason}; {len(self._restarts)} restarts within {self.restart_window_s:g} s did not "
                    "cure it, giving up"
                )
                return False
            self._restarts.append(now)
            self.report(f"fault: {reason}; restarting tritonserver (requests in flight get errors)")
            self.server.kill()
            try:
                self.server.start(self.start_timeout_s)
            except ServerError as error:
                reason = f"restart failed: {error}"
                time.sleep(min(2.0 ** len(self._restarts), 30.0))
                continue
            self.report(
                f"restored: tritonserver is ready again {time.monotonic() - now:.1f} s after the fault was seen "
                f"(log: {self.server.log_path})"
            )
            return True

    def run(self) -> int:
        """Watch until interrupted (KeyboardInterrupt goes to the caller); 1 when restarts no longer help."""
        next_probe = time.monotonic() + self.probe_interval_s
        while True:
            reason = self.process_fault()
            if reason is None and time.monotonic() >= next_probe:
                reason = self.probe_fault()
                next_probe = time.monotonic() + self.probe_interval_s
                if reason is not None:
                    # A process that died or stopped during the probe is the cause to report, not the probe.
                    time.sleep(self.poll_s)
                    reason = self.process_fault() or reason
            if reason is not None:
                if not self.restart(reason):
                    return 1
                next_probe = time.monotonic() + self.probe_interval_s
            time.sleep(self.poll_s)


def read_admin_key(path: Optional[Path]) -> Tuple[Optional[str], str]:
    """(the operator's admin key, where it came from): --admin-key-file, else $SAFETY_CHECKER_ADMIN_KEY, else
    (None, ...), which makes the launcher use a random key that nobody is shown."""
    if path is not None:
        try:
            key = Path(path).read_text().strip()
        except OSError as error:
            raise ServerError(f"cannot read the admin key file {path}: {error.strerror or error}") from None
        admin_restriction(key)
        return key, f"the key in {path}"
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if key:
        admin_restriction(key)
        return key, f"the key in ${ADMIN_KEY_ENV}"
    return None, "refused to everyone (no key given)"


def serve_forever(
    repository: Path,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    model_config_name: Optional[str] = "cpu",
    admin_key_file: Optional[Path] = None,
    supervise: bool = True,
    probe_interval_s: float = 2.0,
    probe_timeout_s: float = 5.0,
) -> int:
    """Serve until Ctrl-C or SIGTERM (exit code 0); 1 with a one-line message on any error.

    Backs `safety-checker serve`: prints where the server listens and which
    models are READY, then nothing more on stdout. With `supervise` a
    `Supervisor` restores service after a fault (one line on stderr for each
    fault and each restoration); without it, the server exiting ends the
    command with code 1.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    server: Optional[TritonServer] = None
    try:
        admin_key, key_source = read_admin_key(admin_key_file)
        server = TritonServer(
            Path(repository),
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            host=host,
            model_config_name=model_config_name,
            admin_key=admin_key,
        )
        server.start()
        supervisor = (
            Supervisor(server, probe_interval_s=probe_interval_s, probe_timeout_s=probe_timeout_s)
            if supervise
            else None
        )
        if supervisor is not None:
            first = supervisor.probe_fault(timeout_s=max(60.0, probe_timeout_s))
            if first is not None:
                raise ServerError(f"the freshly started server fails its {first}")
        print(f"Serving {server.repository}")
        print(f"  HTTP:    http://{server.http_url}")
        print(f"  gRPC:    {server.grpc_url}")
        print(f"  metrics: {server.metrics_url}")
        print(f"  models:  {', '.join(server.ready_models()) or '(none)'}")
        print(f"  admin:   {', '.join(ADMIN_APIS)}: {key_source}")
        if supervisor is None:
            print("  watch:   none (a fault is not repaired)")
        elif supervisor.probe_model is None:
            print(f"  watch:   the server and its Python stubs, every {supervisor.poll_s:g} s (nothing to probe)")
        else:
            print(
                f"  watch:   the server and its Python stubs, and a real inference through "
                f"{supervisor.probe_model} every {probe_interval_s:g} s; a fault restarts the server"
            )
        print(f"  log:     {server.log_path}")
        print("Press Ctrl-C to stop.", flush=True)
        if supervisor is not None:
            return supervisor.run()
        code = server.wait()
        print(f"error: {server._failure(f'tritonserver exited on its own with code {code}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (ServerError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for sig in handled:  # a second signal must not interrupt the orderly stop
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
