"""How many requests each server has at once: a window sized from its answers (`--concurrency auto`), or a fixed one.

A request queued behind many others at a slow server waits past its deadline and is computed for nobody; too few in
flight leave a fast server idle between round trips. So each server gets its own window, adjusted the way TCP Vegas
adjusts its congestion window: the lowest latency seen for a full batch is what a request costs with nothing queued
ahead of it (`base_s`), and a request that took `latency` while `k` were in flight at its server says that about
k * (1 - base_s / latency) requests were waiting there. Once per round trip, judging the round's fastest answer
(as Copa does: a queue delays them all, a hiccup only some), the window grows by one while fewer than QUEUED_LOW
wait, and shrinks by the excess while more than QUEUED_HIGH do (a server that slowed down is relieved in one round
trip), between 1 and MAX_WINDOW; and it grows only while a request would wait less than MAX_QUEUE_S, before a
server's own queue timeout refuses it. A server computing one batch at a time in a second or two (a CPU with the
full-size checker) thus keeps one or two requests waiting behind the one it computes: never idle, never a long
queue; one taking many seconds over a batch (the same on a loaded machine) gets one at a time; a fast one, or one
with many instances, gets as many in flight as hide its round trips. The window only grows while it is used (the
scan may be slower than the server), and a failure starts the server's window afresh.

Each attempt's timeout follows the same measurements: TIMEOUT_FACTOR times the server's smoothed latency, at least
MIN_TIMEOUT_S and at most the scan's cap, so queued work never times out into a retry while a server that stopped
answering is given up in a minute, not ten. Over gRPC a timeout cancels the request at the server (Triton drops a
cancelled request from its queues and between ensemble steps). The clock is injected: tests simulate servers.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Requests waiting at a server (estimated) below which its window grows, and above which it shrinks.
QUEUED_LOW, QUEUED_HIGH = 0.9, 2.0
# The longest a request should wait at a server: a third of the CPU embedder's queue timeout, after which Triton
# refuses it. A server that takes longer than this over one batch gets one request at a time.
MAX_QUEUE_S = 10.0
INITIAL_WINDOW = 1
# Per server: were a whole window to wait at the CPU embedder, its bounded queue (max_queue_size) would refuse none.
MAX_WINDOW = 16
# An attempt's timeout: this many times the server's smoothed latency, within [MIN_TIMEOUT_S, the scan's cap].
TIMEOUT_FACTOR = 10.0
MIN_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 600.0  # the longest by default, and the first attempts' (`--timeout` replaces them all)
SMOOTHING = 0.125  # weight of the newest latency in the smoothed one (as TCP's SRTT)


class Window:
    """One server's window of requests in flight, resized from the latencies of its answers."""

    def __init__(self, maximum: int = MAX_WINDOW) -> None:
        self.limit = min(INITIAL_WINDOW, maximum)
        self.maximum = maximum
        self.largest = self.limit  # the largest window so far, for the summary
        self.in_flight = 0
        self.base_s = float("inf")  # the lowest latency of a full batch since the server's last failure
        self.smoothed_s: Optional[float] = None
        # Rounds of about one round trip: one ends with the first answer to a request sent during it. Its fastest
        # answer is judged (a queue delays every answer of a round, a hiccup of the network or the client only some).
        self.round = 0
        self._fastest = (float("inf"), 0)  # this round's lowest latency, and the requests in flight with it
        self._used = False  # whether a request of this round was sent with the window full

    def queued(self, in_flight: int, latency_s: float) -> float:
        """Requests estimated to have waited at the server before one that took `latency_s` with `in_flight`."""
        if latency_s <= 0 or self.base_s == float("inf"):
            return 0.0
        return max(0.0, in_flight * (1.0 - self.base_s / latency_s))

    def answered(self, ticket: Ticket, latency_s: float, adjust: bool = True) -> None:
        """Learn from an answer; with `adjust`, resize the window at the end of a round (a fixed one only times its
        attempts)."""
        self.in_flight -= 1
        if ticket.full:
            self.base_s = min(self.base_s, latency_s)
        if self.smoothed_s is None:
            self.smoothed_s = latency_s
        else:
            self.smoothed_s += SMOOTHING * (latency_s - self.smoothed_s)
        self._fastest = min(self._fastest, (latency_s, ticket.in_flight))
        self._used = self._used or ticket.window_full
        if not adjust or ticket.round < self.round:
            return
        latency_s, in_flight = self._fastest
        queued, waited_s = self.queued(in_flight, latency_s), latency_s - self.base_s
        # One more request would wait about as long as the fastest answer took (what is queued, and one batch).
        roomy = latency_s <= MAX_QUEUE_S
        if queued < QUEUED_LOW and roomy and self._used and self.limit < self.maximum:
            self.limit += 1
            self.largest = max(self.largest, self.limit)
        elif (queued > QUEUED_HIGH or waited_s > MAX_QUEUE_S) and self.limit > 1:
            self.limit = max(1, self.limit - max(1, int(queued - QUEUED_HIGH)))  # the excess at once
        self._next_round()

    def _next_round(self) -> None:
        self.round += 1
        self._fastest, self._used = (float("inf"), 0), False

    def failed(self) -> None:
        """The server did not answer: it may come back restarted, elsewhere or loaded; measure it afresh."""
        self.in_flight -= 1
        self.limit = min(INITIAL_WINDOW, self.maximum)
        self.base_s, self.smoothed_s = float("inf"), None
        self._next_round()

    def timeout_s(self, cap_s: float) -> float:
        if self.smoothed_s is None:
            return cap_s  # no answer yet: a server may take long over its first requests
        return min(cap_s, max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * self.smoothed_s))


class Ticket:
    """One request's place in a window: `start` when it is sent, `finish` once, when its first server answered or
    failed (a request that fails over counts only against the server it was sent to first)."""

    def __init__(self, pacing: Pacing, url: Optional[str], window: Window, full: bool) -> None:
        self.pacing, self.url, self.window, self.full = pacing, url, window, full
        self.in_flight = window.in_flight
        self.window_full = window.in_flight >= window.limit
        self.round = window.round
        self.timeout_s: Optional[float] = None if pacing.fixed_timeout else window.timeout_s(pacing.timeout_cap_s)
        self.started: Optional[float] = None
        self.finished = False

    def start(self) -> None:
        if self.started is None:
            self.started = self.pacing.monotonic()

    def finish(self, answered: bool) -> None:
        self.pacing.finish(self, answered)


class Pacing:
    """The windows of the scan's servers: one each, adjusted as they answer (`fixed` None), or `fixed` requests in
    flight over all servers, handed out in turn as before (`url` None: the servers' round-robin chooses)."""

    def __init__(
        self,
        urls: Sequence[str],
        fixed: Optional[int],
        monotonic: Callable[[], float],
        resting: Callable[[str], bool] = lambda url: False,
        timeout_cap_s: float = MAX_TIMEOUT_S,
        fixed_timeout: bool = False,
        maximum: int = MAX_WINDOW,
    ) -> None:
        self.urls, self.fixed, self.monotonic, self.resting = list(urls), fixed, monotonic, resting
        self.timeout_cap_s, self.fixed_timeout = timeout_cap_s, fixed_timeout
        self._lock = threading.Lock()
        self._turn = 0
        if fixed is None:
            self.windows: Dict[Optional[str], Window] = {url: Window(maximum) for url in self.urls}
        else:
            self.windows = {None: Window(fixed)}
            self.windows[None].limit = fixed

    @property
    def limit(self) -> int:
        """Requests in flight the windows allow now, over all servers."""
        with self._lock:
            return sum(window.limit for window in self.windows.values())

    @property
    def most(self) -> int:
        """Requests in flight the windows could ever allow, over all servers."""
        return sum(window.maximum for window in self.windows.values())

    def take(self, full: bool = True) -> Optional[Ticket]:
        """A place for one more request (`full`: of a whole batch), or None while every window is full. The server
        with the most room first; those resting after a failure only when every server rests."""
        with self._lock:
            start = self._turn % len(self.windows)
            keys: List[Optional[str]] = list(self.windows)
            keys = keys[start:] + keys[:start]
            awake = [key for key in keys if key is None or not self.resting(key)]
            open_ = [key for key in awake or keys if self.windows[key].in_flight < self.windows[key].limit]
            if not open_:
                return None
            chosen = max(open_, key=lambda key: self.windows[key].limit - self.windows[key].in_flight)
            self._turn += 1
            window = self.windows[chosen]
            window.in_flight += 1
            return Ticket(self, chosen, window, full)

    def finish(self, ticket: Ticket, answered: bool) -> None:
        with self._lock:
            if ticket.finished:
                return
            ticket.finished = True
            if answered and ticket.started is not None:
                ticket.window.answered(ticket, self.monotonic() - ticket.started, adjust=self.fixed is None)
            elif self.fixed is None:
                ticket.window.failed()
            else:
                ticket.window.in_flight -= 1

    def sizes(self) -> Dict[str, Tuple[int, int]]:
        """Each server's window now and at its largest (none for a fixed window)."""
        with self._lock:
            return {key: (w.limit, w.largest) for key, w in self.windows.items() if key is not None}
