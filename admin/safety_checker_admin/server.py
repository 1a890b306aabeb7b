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

Only this module's caller imports tritonclient; here we speak plain HTTP so
the module stays light (pytriton is located with find_spec, never imported).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
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
from typing import List, Optional, Sequence, Tuple, Type

# Requests to our own server must never go through an http(s)_proxy.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Triton log lines that are errors but only say "no GPU here"; hidden from messages.
_NOISE = ("CudaDriverHelper", "NVML", "DCGM")
_LOG_PREFIX = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")


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
    ) -> None:
        """`arguments`: run tritonserver with exactly these arguments (a deployment's own command line, e.g. a
        KServe ServingRuntime's) instead of the launcher's; only --backend-directory is added, and the ports
        given here must be the ones in them (they are polled). `wrapper`: a command the server runs under
        (e.g. a mount namespace that puts the repository where those arguments expect it)."""
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
        self._process: Optional[subprocess.Popen] = None
        self._backend_dir: Optional[Path] = None
        self._log_path: Optional[Path] = None

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
        return env

    def _command(self, binary: Path, backends: Path) -> List[str]:
        if self.arguments is not None:
            return [*self.wrapper, str(binary), f"--backend-directory={backends}", *self.arguments]
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
            # How long SIGTERM waits for in-flight requests -- and for idle keep-alive
            # client connections, which otherwise hold shutdown for the default 30 s.
            "--exit-timeout-secs=10",
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
        """Names of the models whose state is READY, from the repository index."""
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/index",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
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


def serve_forever(
    repository: Path,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    model_config_name: Optional[str] = "cpu",
) -> int:
    """Serve until Ctrl-C or SIGTERM (exit code 0); 1 with a one-line message on any error.

    Backs `safety-checker serve`: prints where the server listens and which
    models are READY, then nothing more.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    server: Optional[TritonServer] = None
    try:
        server = TritonServer(
            Path(repository),
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            host=host,
            model_config_name=model_config_name,
        )
        server.start()
        print(f"Serving {server.repository}")
        print(f"  HTTP:    http://{server.http_url}")
        print(f"  gRPC:    {server.grpc_url}")
        print(f"  metrics: {server.metrics_url}")
        print(f"  models:  {', '.join(server.ready_models()) or '(none)'}")
        print(f"  log:     {server.log_path}")
        print("Press Ctrl-C to stop.", flush=True)
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
