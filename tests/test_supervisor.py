"""The supervisor on a fake server and a fake clock: exact counts of probes sent, restarts made and pauses taken.

No tritonserver runs here and nothing waits: the clock moves only when the
supervisor sleeps (fake_clock.py), faults are scheduled on it, and the probe
is a function that answers as each test says. tests/test_faults.py runs real
faults through a real tritonserver.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from conftest import ROOT
from fake_clock import FakeClock

from safety_checker_admin.errors import ServerError
from safety_checker_admin.probe import load_health_probe
from safety_checker_admin.supervisor import Supervisor
from safety_checker_client import spec

PROBE = load_health_probe(ROOT / "model_repository")
EMBEDDER_STUB = 101


class FakeServer:
    """What the supervisor asks of a TritonServer, with counts of kills and starts."""

    def __init__(self, repository: Path, start_failures: int = 0) -> None:
        self.repository = repository
        self.arguments = None
        self.client_host = "127.0.0.1"
        self.ports = {"HTTP": 8000}
        self.log_path = repository / "tritonserver.log"
        self.running, self.return_code = True, None
        self.states: Dict[int, Tuple[str, Optional[str]]] = {EMBEDDER_STUB: (spec.EMBEDDER_MODEL, "S")}
        self.cpu = 0.0
        self.kills, self.starts, self.start_failures = 0, 0, start_failures

    def stub_states(self) -> Dict[int, Tuple[str, Optional[str]]]:
        return dict(self.states)

    def cpu_seconds(self) -> float:
        return self.cpu

    def kill(self) -> None:
        self.kills += 1
        self.running, self.return_code = False, -9

    def start(self, timeout_s: float) -> FakeServer:
        self.starts += 1
        if self.start_failures:
            self.start_failures -= 1
            raise ServerError("failed to load 'safety_checker_embedder'")
        self.running, self.return_code = True, None
        self.states = {EMBEDDER_STUB + self.starts: (spec.EMBEDDER_MODEL, "S")}
        return self

    def exit(self, code: int) -> None:
        """tritonserver exits on its own."""
        self.running, self.return_code = False, code

    def stub(self, state: Optional[str]) -> None:
        """Put the running embedder stub in `state` (None: gone)."""
        ((pid, (model, _)),) = self.states.items()
        self.states = {pid: (model, state)}


class Probe:
    """Answers each probe with the next of `statuses` (then OK), taking `takes_s` of the clock."""

    def __init__(self, clock: FakeClock, statuses: List[str] = (), takes_s: float = 0.0, server=None, cpu_s=0.0):
        self.clock, self.statuses, self.takes_s = clock, list(statuses), takes_s
        self.server, self.cpu_s = server, cpu_s
        self.sent: List[float] = []

    def __call__(self, host: str, port: int, timeout_s: float, model: str) -> Tuple[str, str]:
        self.sent.append(self.clock.now)
        self.clock.advance(self.takes_s)
        if self.server is not None:
            self.server.cpu += self.cpu_s
        status = self.statuses.pop(0) if self.statuses else PROBE.OK
        return status, f"{model} answered {status}"


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A repository the supervisor can probe: its health_probe.py and the probe's model folder."""
    shutil.copy(ROOT / "model_repository" / "health_probe.py", tmp_path / "health_probe.py")
    (tmp_path / PROBE.PROBE_MODEL).mkdir()
    return tmp_path


def supervised(server: FakeServer, clock: FakeClock, probe: Probe, reports: List[str], **options) -> Supervisor:
    return Supervisor(
        server, report=reports.append, probe=probe, monotonic=clock.monotonic, sleep=clock.sleep, **options
    )


def test_a_healthy_server_is_probed_every_interval_and_never_restarted(repository):
    clock, reports, server = FakeClock(until=10.0), [], FakeServer(repository)
    probe = Probe(clock)
    with pytest.raises(KeyboardInterrupt):
        supervised(server, clock, probe, reports, poll_s=0.5, probe_interval_s=2.0).run()
    assert probe.sent == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert clock.sleeps == [0.5] * 21
    assert (server.kills, server.starts, reports) == (0, 0, [])


@pytest.mark.parametrize(
    "state, reason",
    [(None, "died"), ("Z", "died"), ("T", "is stopped"), ("t", "is stopped")],
    ids=["gone", "zombie", "stopped", "traced"],
)
def test_a_stub_fault_is_seen_at_the_next_poll_and_restarts_the_server_once(repository, state, reason):
    clock, reports, server = FakeClock(until=10.0), [], FakeServer(repository)
    probe = Probe(clock)
    clock.at(3.2, lambda: server.stub(state))
    with pytest.raises(KeyboardInterrupt):
        supervised(server, clock, probe, reports, poll_s=0.5, probe_interval_s=2.0).run()
    assert (server.kills, server.starts) == (1, 1)
    fault, restored = reports
    assert fault.startswith(f"fault: the Python-backend stub of {spec.EMBEDDER_MODEL} (pid {EMBEDDER_STUB}) {reason}")
    assert restored.startswith("restored: tritonserver is ready again 0.0 s after the fault was seen")
    # Seen at the first poll after 3.2 s; the next probe comes a whole interval after the restart.
    assert probe.sent == [2.0, 5.5, 7.5, 9.5]


def test_a_server_that_exited_is_restarted(repository):
    clock, reports, server = FakeClock(until=3.0), [], FakeServer(repository)
    clock.at(1.0, lambda: server.exit(139))
    with pytest.raises(KeyboardInterrupt):
        supervised(server, clock, Probe(clock), reports).run()
    assert reports[0].startswith("fault: tritonserver exited with code 139; restarting tritonserver")
    assert (server.kills, server.starts) == (1, 1) and server.running


def test_a_failed_probe_restarts_the_server(repository):
    clock, reports, server = FakeClock(until=5.0), [], FakeServer(repository)
    probe = Probe(clock, [PROBE.FAILED])
    with pytest.raises(KeyboardInterrupt):
        supervised(server, clock, probe, reports, poll_s=0.5, probe_interval_s=2.0).run()
    assert reports[0] == (
        f"fault: health probe: {PROBE.PROBE_MODEL} answered failed; restarting tritonserver (requests in flight "
        "get errors)"
    )
    assert (server.kills, server.starts) == (1, 1)
    # After the failure one poll passes (a process fault would be named instead), then the restart.
    assert probe.sent == [2.0, 4.5]


def test_a_stub_that_stops_during_the_probe_is_named_rather_than_the_probe(repository):
    clock, reports, server = FakeClock(), [], FakeServer(repository)
    probe = Probe(clock, [PROBE.TIMEOUT], takes_s=5.0)
    clock.at(4.0, lambda: server.stub("T"))  # while the probe waits
    assert supervised(server, clock, probe, reports, max_restarts=0).run() == 1
    (report,) = reports
    assert f"the Python-backend stub of {spec.EMBEDDER_MODEL} (pid {EMBEDDER_STUB}) is stopped" in report


@pytest.mark.parametrize("status", [PROBE.TIMEOUT, PROBE.UNAVAILABLE])
def test_an_unanswered_probe_is_a_fault_only_when_the_server_used_no_cpu(repository, status):
    clock, reports, server = FakeClock(until=6.0), [], FakeServer(repository)
    busy = Probe(clock, [status], takes_s=5.0, server=server, cpu_s=1.0)
    with pytest.raises(KeyboardInterrupt):
        supervised(server, clock, busy, reports, probe_interval_s=2.0).run()
    assert (len(busy.sent), reports, server.kills) == (1, [], 0)  # busy: working through a batch

    clock, reports, server = FakeClock(until=8.0), [], FakeServer(repository)
    hung = Probe(clock, [status], takes_s=5.0)
    with pytest.raises(KeyboardInterrupt):
        supervised(server, clock, hung, reports, probe_interval_s=2.0).run()
    assert reports[0].startswith(f"fault: health probe: {PROBE.PROBE_MODEL} answered {status}")
    assert server.kills == 1


def test_it_gives_up_after_max_restarts_that_fail_backing_off_between_them(repository):
    clock, reports, server = FakeClock(), [], FakeServer(repository, start_failures=10)
    clock.at(1.0, lambda: server.stub(None))
    assert supervised(server, clock, Probe(clock), reports, poll_s=0.5, max_restarts=3).run() == 1
    assert (server.kills, server.starts) == (3, 3)
    assert clock.sleeps == [0.5, 0.5] + [2.0, 4.0, 8.0]
    assert [line.split(":")[0] for line in reports] == ["fault"] * 3 + ["error"]
    assert "restart failed: failed to load 'safety_checker_embedder'" in reports[1]
    assert reports[-1].endswith("3 restarts within 600 s did not cure it, giving up")


def test_only_restarts_within_the_window_count(repository):
    clock, reports, server = FakeClock(), [], FakeServer(repository)
    for when in (10.0, 100.0, 120.0):  # the second is outside the first's window, the third inside the second's
        clock.at(when, lambda: server.stub(None))
    options = {"poll_s": 1.0, "probe_interval_s": 1000.0, "max_restarts": 1, "restart_window_s": 60.0}
    assert supervised(server, clock, Probe(clock), reports, **options).run() == 1
    assert (server.kills, server.starts) == (2, 2)
    assert [line.split(":")[0] for line in reports] == ["fault", "restored", "fault", "restored", "error"]
    assert clock.now == 120.0


def test_a_repository_without_the_probe_gets_the_process_checks_only(tmp_path):
    clock, reports, server = FakeClock(until=10.0), [], FakeServer(tmp_path)
    probe = Probe(clock)
    supervisor = supervised(server, clock, probe, reports)
    assert supervisor.probe_model is None and supervisor.probe_fault() is None
    clock.at(2.0, lambda: server.stub(None))
    with pytest.raises(KeyboardInterrupt):
        supervisor.run()
    assert probe.sent == [] and server.kills == 1
