"""The scan's windows (`--concurrency auto`) against simulated servers on an injected clock: a slow CPU server and
fast ones are kept busy without long queues, a window shrinks when its server slows down; plus the bookkeeping
(which server a request goes to, a failure, the attempts' timeouts, a fixed window) and the scan's options."""

from __future__ import annotations

import argparse
import contextlib
import heapq
import io
import json
import random
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import pytest
from fake_tritonclient import FakeClock
from test_scan_units import FakeServer, fake_items

from safety_checker_scan import cli as scan_cli
from safety_checker_scan.pacing import (
    MAX_QUEUE_S,
    MAX_TIMEOUT_S,
    MAX_WINDOW,
    MIN_TIMEOUT_S,
    TIMEOUT_FACTOR,
    Pacing,
    Ticket,
)
from safety_checker_scan.report import ReportWriter
from safety_checker_scan.scanner import DEFAULT_BATCH_SIZE, Scanner, ScanOptions


@dataclass
class SimServer:
    """A server computing `instances` requests at once, each in images / (rate / instances) seconds, first come
    first served; half the round trip before a request arrives, half after its answer leaves, each half longer by
    up to `jitter_s` (a busy network or client)."""

    rate: float  # images per second, all instances together
    round_trip_s: float
    instances: int = 1
    jitter_s: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(22))
    free_at: List[float] = field(default_factory=list)
    busy_s: float = 0.0
    waits: List[Tuple[float, float]] = field(default_factory=list)  # (arrival, wait before computing)

    def answer_at(self, arrival: float, images: int) -> float:
        """When the answer of a request arriving at `arrival` is back at the client."""
        arrival += self.rng.uniform(0, self.jitter_s)
        if not self.free_at:
            self.free_at = [arrival] * self.instances
        instance = min(range(self.instances), key=self.free_at.__getitem__)
        start = max(arrival, self.free_at[instance])
        service = images * self.instances / self.rate
        self.free_at[instance] = start + service
        self.busy_s += service
        self.waits.append((arrival, start - arrival))
        return start + service + self.round_trip_s / 2 + self.rng.uniform(0, self.jitter_s)


@dataclass
class Run:
    idle_fraction: float  # of the instances' time between the first arrival and the last answer
    windows: List[Tuple[float, int]]  # (time, window) after each answer
    waits: List[Tuple[float, float]]
    seconds: float


def simulate(server: SimServer, requests: int, batch: int, slow_down: Optional[Tuple[int, float]] = None) -> Run:
    """A scan with always a batch ready, paced by a Pacing on a simulated clock; `slow_down` (n, rate): the server's
    rate becomes `rate` after n answers."""
    now = [0.0]
    pacing = Pacing(["sim:1"], None, lambda: now[0])
    events: List[Tuple[float, int, Ticket]] = []
    sent = answered = 0
    first_arrival: Optional[float] = None
    windows: List[Tuple[float, int]] = []

    def send_while_room() -> None:
        nonlocal sent, first_arrival
        while sent < requests:
            ticket = pacing.take(full=True)
            if ticket is None:
                return
            ticket.start()
            arrival = now[0] + server.round_trip_s / 2
            first_arrival = arrival if first_arrival is None else first_arrival
            heapq.heappush(events, (server.answer_at(arrival, batch), sent, ticket))
            sent += 1

    send_while_room()
    while events:
        now[0], _, ticket = heapq.heappop(events)
        ticket.finish(answered=True)
        answered += 1
        windows.append((now[0], pacing.windows["sim:1"].limit))
        if slow_down is not None and answered == slow_down[0]:
            server.rate = slow_down[1]
        send_while_room()
    span = now[0] - server.round_trip_s / 2 - first_arrival
    idle = 1.0 - server.busy_s / (server.instances * span)
    return Run(idle, windows, server.waits, now[0])


@pytest.mark.parametrize("jitter_s, most_waiting", [(0.0, 1), (0.2, 3), (1.0, 3)])
def test_a_cpu_server_answering_2_images_per_s_is_kept_busy_with_a_request_or_two_waiting(jitter_s, most_waiting):
    server = SimServer(rate=2.0, round_trip_s=0.002, jitter_s=jitter_s)
    service = DEFAULT_BATCH_SIZE / 2.0  # 2 s a request
    run = simulate(server, requests=300, batch=DEFAULT_BATCH_SIZE)
    assert run.idle_fraction < 0.01
    # Never the old default's 64 images waiting (32 s, past the CPU embedder's queue timeout).
    assert max(wait for _, wait in run.waits) <= most_waiting * service + 1e-9
    assert {window for _, window in run.windows[10:]} <= {2, 3, 4}


@pytest.mark.parametrize(
    "rate, round_trip_s, batch, instances, jitter_s, least_window",
    [
        (300.0, 0.002, DEFAULT_BATCH_SIZE, 1, 0.0, 2),  # a fast server, loopback round trips
        (300.0, 0.002, DEFAULT_BATCH_SIZE, 1, 0.005, 2),  # ... and a busy client
        (300.0, 0.002, 1, 1, 0.0, 2),  # single images: the round trip is much of a request's time
        (300.0, 0.020, 1, 1, 0.0, 7),  # round trips six times an image's time: seven in flight hide them
        (300.0, 0.020, DEFAULT_BATCH_SIZE, 1, 0.010, 2),  # ... with a jittery network
        (300.0, 0.002, DEFAULT_BATCH_SIZE, 8, 0.010, 8),  # eight instances (a GPU's, or cores') compute at once
        (3000.0, 0.002, DEFAULT_BATCH_SIZE, 2, 0.002, 4),  # a GPU: two instances, round trips as long as a batch
    ],
)
def test_a_fast_server_is_kept_busy_with_as_many_requests_in_flight_as_it_takes(
    rate, round_trip_s, batch, instances, jitter_s, least_window
):
    server = SimServer(rate=rate, round_trip_s=round_trip_s, instances=instances, jitter_s=jitter_s)
    service = batch * instances / rate
    run = simulate(server, requests=3000, batch=batch)
    assert run.idle_fraction < 0.03
    settled = [window for time, window in run.windows if time > run.seconds / 2]
    assert min(settled) >= least_window and max(settled) < MAX_WINDOW
    assert max(wait for _, wait in run.waits) <= 4 * service


def test_a_window_shrinks_when_its_server_slows_down_and_the_queue_stays_short():
    server = SimServer(rate=300.0, round_trip_s=0.020)
    run = simulate(server, requests=3000, batch=1, slow_down=(1500, 30.0))
    change = run.windows[1499][0]
    before = [window for time, window in run.windows if change / 2 < time <= change]
    after = [window for time, window in run.windows if time > change + (run.seconds - change) / 2]
    assert min(before) >= 7 and max(after) <= 3
    slow_service = 1 / 30.0
    settled_waits = [wait for arrival, wait in run.waits if arrival > change + 1.0]
    assert max(settled_waits) <= 2 * slow_service
    assert run.idle_fraction < 0.03


def answer(pacing: Pacing, latency_s: float, now: List[float]) -> Ticket:
    """One request sent and answered after `latency_s` on the clock `now`."""
    ticket = pacing.take()
    ticket.start()
    now[0] += latency_s
    ticket.finish(answered=True)
    return ticket


def test_a_window_grows_only_while_it_is_used():
    """A scan slower than its server (reading files) sends one request at a time: the window grows once (the first
    round's request filled a window of one), then stays, however fast the answers."""
    now = [0.0]
    pacing = Pacing(["a:1"], None, lambda: now[0])
    for _ in range(20):
        answer(pacing, 1.0, now)
    assert pacing.windows["a:1"].limit == 2


def test_requests_go_to_the_server_with_room_and_a_resting_one_only_when_all_rest():
    now = [0.0]
    resting = {"b:1"}
    pacing = Pacing(["a:1", "b:1"], None, lambda: now[0], resting=resting.__contains__)
    first = pacing.take()
    assert first.url == "a:1" and pacing.take() is None  # b:1 rests while a:1 answers: wait for a:1's room
    resting.update({"a:1"})
    pacing = Pacing(["a:1", "b:1"], None, lambda: now[0], resting=resting.__contains__)
    assert sorted([pacing.take().url, pacing.take().url]) == ["a:1", "b:1"]  # all rest: any may be tried
    resting.clear()
    pacing = Pacing(["a:1", "b:1"], None, lambda: now[0], resting=resting.__contains__)
    pacing.windows["a:1"].limit = 3  # as if it had grown: b:1's stays at one
    taken = [pacing.take() for _ in range(4)]
    assert sorted(ticket.url for ticket in taken if ticket) == ["a:1", "a:1", "a:1", "b:1"]
    assert taken[0].url == "a:1"  # the most room first


def test_a_failure_starts_the_window_afresh_and_timeouts_follow_the_latency():
    now = [0.0]
    pacing = Pacing(["a:1"], None, lambda: now[0], timeout_cap_s=MAX_TIMEOUT_S)
    first = answer(pacing, 30.0, now)
    second = answer(pacing, 3.0, now)
    assert first.timeout_s == MAX_TIMEOUT_S  # nothing measured yet: a first request may be slow
    assert second.timeout_s == TIMEOUT_FACTOR * 30.0
    for _ in range(30):
        answer(pacing, 3.0, now)
    assert pacing.take().timeout_s == MIN_TIMEOUT_S  # 10 x about 3 s is below the least
    window = pacing.windows["a:1"]
    assert window.limit >= 2 and window.in_flight == 1
    failing = pacing.take()
    failing.start()
    failing.finish(answered=False)
    failing.finish(answered=False)  # counted once
    assert window.limit == 1 and window.in_flight == 1 and window.smoothed_s is None
    assert window.base_s == float("inf")


def test_a_fixed_concurrency_keeps_exactly_n_in_flight_over_all_servers_in_turn():
    now = [0.0]
    pacing = Pacing(["a:1", "b:1"], 3, lambda: now[0], fixed_timeout=True)
    tickets = [pacing.take() for _ in range(3)]
    assert pacing.take() is None and all(t.url is None and t.timeout_s is None for t in tickets)
    for ticket in tickets:
        ticket.start()
        now[0] += 100.0  # however slow: a fixed window does not move
        ticket.finish(answered=True)
    assert pacing.limit == 3 and pacing.windows[None].in_flight == 0


def test_the_scan_sends_each_attempt_with_its_windows_timeout():
    """Through the scanner and the real client: the first request waits up to the cap, the next ones ten times
    the latency, at least a minute (the fake server answers at once: a minute)."""
    server = FakeServer("a:1")
    timeouts: List[float] = []
    answer = server.answer

    def recording(batch, names, kwargs):
        timeouts.append(kwargs["client_timeout"])
        return answer(batch, names, kwargs)

    server.answer = recording
    clock = FakeClock()
    out = io.StringIO()
    scanner = Scanner(
        ScanOptions(urls=["a:1"], mode="uint8", workers=2),
        ReportWriter(out, ".jsonl", header=False, owned=False),
        make_client=lambda url: server.client(url, "uint8"),
        warn=lambda message: None,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        prepare=lambda item, mode: item,
    )
    result = scanner.run(fake_items(40))
    assert result.tally.checked == 40 and len(out.getvalue().splitlines()) == 40
    assert len(timeouts) == 40 // DEFAULT_BATCH_SIZE
    assert timeouts[0] == MAX_TIMEOUT_S and set(timeouts[1:]) == {MIN_TIMEOUT_S}


@pytest.mark.parametrize(
    "args, concurrency, timeout",
    [([], None, None), (["--concurrency", "auto"], None, None), (["--concurrency", "3", "--timeout", "9"], 3, 9.0)],
)
def test_concurrency_is_auto_by_default_or_a_fixed_number(args, concurrency, timeout):
    parser = argparse.ArgumentParser()
    scan_cli.add_parser(parser.add_subparsers())
    parsed = parser.parse_args(["scan", "x", *args])
    assert (parsed.concurrency, parsed.timeout, parsed.batch_size) == (concurrency, timeout, DEFAULT_BATCH_SIZE)
    help_text = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(help_text):
        parser.parse_args(["scan", "--help"])
    assert "auto|N" in help_text.getvalue() and "cancelled" in help_text.getvalue()


def run_auto(items, servers) -> Tuple[object, List[dict], Scanner]:
    out = io.StringIO()
    clock = FakeClock()
    scanner = Scanner(
        ScanOptions(urls=list(servers), mode="uint8", workers=2),
        ReportWriter(out, ".jsonl", header=False, owned=False),
        make_client=lambda url: servers[url].client(url, "uint8"),
        warn=lambda message: None,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        prepare=lambda item, mode: item,
    )
    result = scanner.run(items)
    return result, [json.loads(line) for line in out.getvalue().splitlines()], scanner


def test_auto_windows_share_the_work_and_a_failing_server_falls_back_to_one_request():
    servers = {"up:1": FakeServer("up:1"), "down:1": FakeServer("down:1", fail=True)}
    result, records, scanner = run_auto(fake_items(200), servers)
    assert sorted(int(r["path"][6:-4]) for r in records) == list(range(200)) and result.tally.errors == 0
    assert sorted(servers["up:1"].seen) == list(range(200))
    windows = scanner.pacing.windows
    assert windows["down:1"].limit == 1 and 1 <= servers["down:1"].requests <= 2
    assert result.windows["up:1"][1] >= 2 and windows["up:1"].in_flight == windows["down:1"].in_flight == 0


def test_a_server_taking_20_s_over_a_batch_gets_one_request_at_a_time_and_none_waits_past_its_queue_timeout():
    """The full-size checker on a loaded 2-core machine (0.2 images/s): two requests waiting would be 40 s, past the
    30 s after which the CPU embedder refuses a queued request."""
    server = SimServer(rate=0.2, round_trip_s=0.002, jitter_s=0.05)
    run = simulate(server, requests=60, batch=DEFAULT_BATCH_SIZE)
    assert max(wait for _, wait in run.waits) <= MAX_QUEUE_S
    assert run.idle_fraction < 0.01
    assert {window for _, window in run.windows[5:]} == {1}
