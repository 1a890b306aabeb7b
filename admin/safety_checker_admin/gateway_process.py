"""The gateway (`safety-checker gateway`, package safety-checker-gateway) beside the bundled server.

`safety-checker serve --gateway-port PORT` runs it as a child process of its
own, in this interpreter, pointed at the server's gRPC port: its event loop
never competes with the supervisor, and a gateway that dies is restarted on
its own without touching tritonserver. The gateway package is never imported
here, only looked up, so the operator package works without it.
`arguments` is the gateway's command line for every place it runs (serve,
docker-compose, the KServe transformer: deploy/render.py writes it there).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Callable, List, Optional

from safety_checker_admin.errors import ServerError
from safety_checker_admin.server import LOCAL_HTTP, READY_POLL_S, die_with_parent, port_in_use

# The gateway's own package; `pip install ./gateway` installs it.
PACKAGE = "safety_checker_gateway"
INSTALL_HINT = "pip install ./gateway"
# What the gateway logs under `serve`: its warnings (Triton unreachable, a failed request), not a line per request.
LOG_LEVEL = "warning"
# How long start() waits for /v2/health/live: the gateway imports its stack and binds, nothing more.
START_TIMEOUT_S = 60.0


def arguments(triton: str, *, host: str, port: int, api_key_file: Optional[str] = None) -> List[str]:
    """`safety-checker gateway`'s arguments (after the subcommand) for Triton's gRPC endpoint `triton`, listening
    on host:port, with a Bearer token from `api_key_file` when given: the same flags wherever it runs."""
    flags = [f"--triton={triton}", f"--host={host}", f"--port={port}"]
    if api_key_file is not None:
        flags.append(f"--api-key-file={api_key_file}")
    return flags


def installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


class GatewayProcess:
    """One gateway process: `start()` returns once it answers /v2/health/live, `stop()` ends it."""

    def __init__(
        self,
        triton: str,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        api_key_file: Optional[Path] = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`triton`: the server's gRPC endpoint (HOST:PORT); `monotonic`, `sleep`: the clock start() waits by."""
        if not installed():
            raise ServerError(f"--gateway-port needs the gateway, which is not installed: {INSTALL_HINT}")
        self.triton, self.host, self.port = triton, host, port
        self.api_key_file = None if api_key_file is None else Path(api_key_file).resolve()
        self._monotonic, self._sleep = monotonic, sleep
        self._process: Optional[subprocess.Popen] = None
        self._log_path: Optional[Path] = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def log_path(self) -> Optional[Path]:
        """The gateway's output of the latest start (kept after stop); None before start."""
        return self._log_path

    @property
    def command(self) -> List[str]:
        key = None if self.api_key_file is None else str(self.api_key_file)
        flags = arguments(self.triton, host=self.host, port=self.port, api_key_file=key)
        return [sys.executable, "-m", "safety_checker_client.cli", "gateway", *flags, f"--log-level={LOG_LEVEL}"]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def return_code(self) -> Optional[int]:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def start(self, timeout_s: float = START_TIMEOUT_S) -> GatewayProcess:
        """Launch the gateway and wait until it answers; ServerError (with its last words) on any failure."""
        if self.running:
            raise ServerError("the gateway is already running")
        if port_in_use(self.host, self.port):
            raise ServerError(f"gateway port {self.port} on {self.host} is already in use")
        fd, log_name = tempfile.mkstemp(prefix="safety-checker-gateway-", suffix=".log")
        self._log_path = Path(log_name)
        with os.fdopen(fd, "wb") as log:
            try:
                self._process = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches `serve` only, which stops the gateway in order
                    preexec_fn=die_with_parent,
                )
            except OSError as error:
                raise ServerError(f"cannot run the gateway: {error}") from error
        deadline = self._monotonic() + timeout_s
        while self._monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(self.failure(f"the gateway exited with code {self._process.returncode}"))
            if self._live():
                return self
            self._sleep(READY_POLL_S)
        self.stop()
        raise ServerError(self.failure(f"the gateway did not answer within {timeout_s:g} s"))

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (uvicorn finishes the requests in flight), then SIGKILL after `grace_s`."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _live(self) -> bool:
        try:
            with LOCAL_HTTP.open(f"{self.url}/v2/health/live", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def failure(self, headline: str) -> str:
        """One line: what happened, the gateway's last line of output, and where its log is."""
        try:
            lines = [line for line in self._log_path.read_text(errors="replace").splitlines() if line.strip()]
        except (OSError, AttributeError):
            lines = []
        detail = f": {lines[-1].strip()}" if lines else ""
        return f"{headline}{detail} (log: {self._log_path})"
