"""Keeps a started tritonserver answering (`safety-checker serve`), and restarts it when it cannot.

Triton 2.51's Python backend does not restart a dead stub and its health
endpoints stay green, so the supervisor looks for itself: at the processes,
and with one real tiny inference (the repository's health_probe.py, the very
script the deployments run). Its clock, its sleep and its probe are
arguments, so that tests count probes and restarts without waiting.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, List, Optional, Tuple

from safety_checker_admin.errors import ServerError
from safety_checker_admin.gateway_process import GatewayProcess
from safety_checker_admin.probe import load_health_probe
from safety_checker_admin.server import TritonServer

# (host, port, timeout_s, model) -> (status, message), as health_probe.probe.
Probe = Callable[[str, int, float, str], Tuple[str, str]]
# A server that used at least this share of the wall-clock time a probe waited was busy, not hung.
BUSY_SHARE = 0.1
# The longest pause between two failed restarts (they back off, doubling from 2 s).
MAX_BACKOFF_S = 30.0


def _report(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Supervisor:
    """Watches a started `TritonServer` and restores it after a fault.

    * every `poll_s`: tritonserver has exited, or a Python-backend stub it had
      when it got ready is gone, a zombie or stopped;
    * every `probe_interval_s`: one real tiny inference through the checker
      (at priority 1 so that it never waits behind the queue). An error
      answer is a fault; no answer within `probe_timeout_s` (or Triton's 503)
      is one only if the server and its stubs used no CPU meanwhile: a busy
      server is not a hung one.

    A fault is answered at once: tritonserver and its stubs are killed
    (requests in flight get errors, never answers, and clients retry), their
    shared memory is removed, and a new tritonserver is started. From the kill
    until the new server is ready nothing listens on its ports, so every
    health check, /v2/health/ready included, fails: not-ready. More than
    `max_restarts` restarts within `restart_window_s` means a fault a restart
    does not cure (a model that no longer loads): the supervisor gives up.

    A `gateway` beside the server is watched at every poll too: one that has
    exited is started again on its own (tritonserver is left alone, and the
    gateway's gRPC channel reconnects to a restarted server by itself), under
    the same bound on restarts, counted apart.
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
        report: Callable[[str], None] = _report,
        probe: Optional[Probe] = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        gateway: Optional[GatewayProcess] = None,
    ) -> None:
        """`probe`: sends the inference (default: the `probe` of the repository's health_probe.py); `gateway`: the
        gateway started beside the server, if any."""
        self.server = server
        self.gateway = gateway
        self.poll_s = poll_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.start_timeout_s = start_timeout_s
        self.report = report
        self._monotonic, self._sleep = monotonic, sleep
        # Only a repository with the checker's uint8 ensemble can be probed; any other gets the process checks.
        self.health_probe = load_health_probe(server.repository)
        probe_model = None if self.health_probe is None else self.health_probe.PROBE_MODEL
        probed = probe_model is not None and (
            server.arguments is not None or (server.repository / probe_model).is_dir()
        )
        self.probe_model: Optional[str] = probe_model if probed else None
        self.probe: Optional[Probe] = probe or (None if self.health_probe is None else self.health_probe.probe)
        self._restarts: List[float] = []
        self._gateway_restarts: List[float] = []

    # -- detection --------------------------------------------------------------
    def process_fault(self) -> Optional[str]:
        """Why the server cannot answer, judged from its processes; None when they look healthy."""
        if not self.server.running:
            return f"tritonserver exited with code {self.server.return_code}"
        for pid, (model, state) in self.server.stub_states().items():
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
        cpu, started = self.server.cpu_seconds(), self._monotonic()
        status, message = self.probe(self.server.client_host, self.server.ports["HTTP"], timeout_s, self.probe_model)
        if status == self.health_probe.OK:
            return None
        if status in (self.health_probe.UNAVAILABLE, self.health_probe.TIMEOUT):
            busy = self.server.cpu_seconds() - cpu
            if busy > BUSY_SHARE * (self._monotonic() - started):
                return None  # working through a batch: overloaded, not hung
        return f"health probe: {message}"

    # -- restoration --------------------------------------------------------------
    def _may_restart(self, history: List[float], reason: str) -> bool:
        """Whether one more restart is allowed (and then counted in `history`), or restarts no longer help."""
        now = self._monotonic()
        history[:] = [t for t in history if now - t < self.restart_window_s]
        if len(history) >= self.max_restarts:
            self.report(
                f"error: {reason}; {len(history)} restarts within {self.restart_window_s:g} s did not cure it, "
                "giving up"
            )
            return False
        history.append(now)
        return True

    def restart(self, reason: str) -> bool:
        """Kill and start the server again; False once restarts no longer help."""
        while self._may_restart(self._restarts, reason):
            now = self._monotonic()
            self.report(f"fault: {reason}; restarting tritonserver (requests in flight get errors)")
            self.server.kill()
            try:
                self.server.start(self.start_timeout_s)
            except ServerError as error:
                reason = f"restart failed: {error}"
                self._sleep(min(2.0 ** len(self._restarts), MAX_BACKOFF_S))
                continue
            self.report(
                f"restored: tritonserver is ready again {self._monotonic() - now:.1f} s after the fault was seen "
                f"(log: {self.server.log_path})"
            )
            return True
        return False

    def gateway_fault(self) -> Optional[str]:
        """Why the gateway cannot answer; None when it runs (or there is none)."""
        if self.gateway is None or self.gateway.running:
            return None
        return f"the gateway exited with code {self.gateway.return_code}"

    def restart_gateway(self, reason: str) -> bool:
        """Start the gateway again; False once restarts no longer help."""
        while self._may_restart(self._gateway_restarts, reason):
            self.report(f"fault: {reason}; restarting the gateway")
            self.gateway.stop()
            try:
                self.gateway.start()
            except ServerError as error:
                reason = f"the gateway's restart failed: {error}"
                self._sleep(min(2.0 ** len(self._gateway_restarts), MAX_BACKOFF_S))
                continue
            self.report(f"restored: the gateway answers again (log: {self.gateway.log_path})")
            return True
        return False

    def run(self) -> int:
        """Watch until interrupted (KeyboardInterrupt goes to the caller); 1 when restarts no longer help."""
        next_probe = self._monotonic() + self.probe_interval_s
        while True:
            gateway = self.gateway_fault()
            if gateway is not None and not self.restart_gateway(gateway):
                return 1
            reason = self.process_fault()
            if reason is None and self._monotonic() >= next_probe:
                reason = self.probe_fault()
                next_probe = self._monotonic() + self.probe_interval_s
                if reason is not None:
                    # A process that died or stopped during the probe is the cause to report, not the probe.
                    self._sleep(self.poll_s)
                    reason = self.process_fault() or reason
            if reason is not None:
                if not self.restart(reason):
                    return 1
                next_probe = self._monotonic() + self.probe_interval_s
            self._sleep(self.poll_s)
