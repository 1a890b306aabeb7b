"""The scan's servers: round-robin over the URLs, failing over at once, and resting a server that failed.

The client sends each request once and splits a batch refused for one image
(`check_each`). Images a server could not answer (CheckError.retryable: a
refused connection, a timeout, an overloaded or failing server) go at once
to the next server, and the server rests (COOLDOWN_S, doubled at each further
failure up to MAX_COOLDOWN_S) while the others take its share: a dead server
costs one refused connection, not a wait. When every server has been tried,
the request waits as the client's retries do (RETRY_FIRST_WAIT_S, growing to
RETRY_MAX_WAIT_S) and tries them again, for up to RETRY_S in all; then its
images are not checked. The first failure of a server that was answering is
reported at once (`warnings`). A request's first attempt goes to the server
its window chose (pacing.py), and tells the window how long it took; each
attempt's timeout is the window's. The clock and the sleep are injected, so
tests count tries instead of waiting.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from safety_checker_client.client import RETRY_FIRST_WAIT_S, RETRY_GROWTH, RETRY_MAX_WAIT_S, CheckResult
from safety_checker_client.errors import CheckError
from safety_checker_scan.files import Item
from safety_checker_scan.pacing import Ticket

# A server that failed is skipped this long, doubled at each further failure up to the maximum.
COOLDOWN_S = 5.0
MAX_COOLDOWN_S = 60.0
# How long a request's images may wait for some server to answer them (--timeout, if shorter) before they count
# as not checked: a server restarting comes back within it.
RETRY_S = 30.0

Failure = Union[CheckError, str]
Outcome = Tuple[Item, Optional[CheckResult], Optional[Failure]]


class Servers:
    """Round-robin over URLs with one client per thread and URL; servers that fail are skipped for a while."""

    def __init__(
        self,
        urls: Sequence[str],
        make_client: Callable[[str], object],
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        retry_s: float = RETRY_S,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.urls = list(urls)
        self.make_client = make_client
        self.monotonic, self.sleep, self.retry_s = monotonic, sleep, retry_s
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self._turn = 0
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._cooldown = dict.fromkeys(self.urls, COOLDOWN_S)
        self._local = threading.local()
        self._clients: List[object] = []
        self.failures = dict.fromkeys(self.urls, 0)
        self._answering = dict.fromkeys(self.urls, True)  # no failure since its last answer (or the start)
        self.warnings: List[str] = []  # for the scan to print (from its main thread, off the progress bar)

    def order(self, first: Optional[str] = None) -> List[str]:
        """Every URL once: `first`, or else the next in turn, first; servers resting after a failure last."""
        with self._lock:
            start = self._turn % len(self.urls)
            self._turn += 1
            now = self.monotonic()
            rotated = self.urls[start:] + self.urls[:start]
            up = [u for u in rotated if self._down_until[u] <= now]
            ordered = up + [u for u in rotated if u not in up]
        return ordered if first is None else [first] + [u for u in ordered if u != first]

    def resting(self, url: str) -> bool:
        """Whether `url` failed lately and is left to the others for now."""
        with self._lock:
            return self._down_until[url] > self.monotonic()

    def client(self, url: str):
        clients: Dict[str, object] = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if url not in clients:
            clients[url] = self.make_client(url)
            with self._lock:
                self._clients.append(clients[url])
        return clients[url]

    def failed(self, url: str, error: object) -> None:
        """Rest the server, say so if it was answering, and start this thread's next request to it afresh."""
        with self._lock:
            self.failures[url] += 1
            rest = self._cooldown[url]
            self._down_until[url] = self.monotonic() + rest
            self._cooldown[url] = min(rest * 2, MAX_COOLDOWN_S)
            if self._answering[url]:
                self._answering[url] = False
                others = [u for u in self.urls if u != url]
                then = (
                    f"its images go to {', '.join(others)} at once; it is tried again in {rest:g} s"
                    if others
                    else f"its images are sent again for up to {self.retry_s:g} s, then reported as not checked"
                )
                self.warnings.append(f"scan: no answer from {url}: {error}; {then}")
        client = getattr(self._local, "clients", {}).pop(url, None)
        if client is not None:
            _close_quietly(client)

    def answered(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = 0.0
            self._cooldown[url] = COOLDOWN_S
            self._answering[url] = True

    def take_warnings(self) -> List[str]:
        with self._lock:
            taken, self.warnings = self.warnings, []
        return taken

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            _close_quietly(client)


def _close_quietly(client) -> None:
    try:
        client.close()
    except Exception:
        pass


def check_items(
    servers: Servers, items: List[Item], mode: str, strictness, ticket: Optional[Ticket] = None
) -> List[Outcome]:
    """Each item's answer or error: the images a server could not answer go to the next one at once; once every
    server was tried, they wait (growing waits) and go round again, until `servers.retry_s`. The first attempt goes
    to `ticket`'s server and is timed for its window."""
    outcomes: List[Outcome] = [(item, None, None) for item in items]
    pending = list(range(len(items)))
    last_error: Dict[str, str] = {}
    started, wait, tries = servers.monotonic(), RETRY_FIRST_WAIT_S, 0
    while True:
        for url in servers.order(ticket.url if ticket is not None and tries == 0 else None):
            data = [items[i].data for i in pending]
            batch = data if mode == "encoded" else np.stack(data)
            tries += 1
            client = servers.client(url)
            if ticket is not None and ticket.timeout_s is not None:
                client.timeout_s = ticket.timeout_s  # this thread's own client: it sends one request at a time
            if ticket is not None and tries == 1:
                ticket.start()
            try:
                answers = client.check_each(batch, strictness)
            except Exception as error:  # anything unexpected: the images are not checked, and say why
                for i in pending:
                    outcomes[i] = (items[i], None, f"{type(error).__name__}: {error}")
                return outcomes
            unanswered: List[int] = []
            for i, answer in zip(pending, answers):
                if isinstance(answer, CheckResult):
                    outcomes[i] = (items[i], answer, None)
                elif answer.retryable:
                    unanswered.append(i)
                    last_error[url] = str(answer)
                else:
                    outcomes[i] = (items[i], None, answer)
            if unanswered:
                servers.failed(url, last_error[url])
            else:
                servers.answered(url)
            if ticket is not None and tries == 1:
                ticket.finish(answered=not unanswered)
            pending = unanswered
            if not pending:
                return outcomes
        pause = wait * servers.rng.uniform(0.5, 1.0)
        elapsed = servers.monotonic() - started
        if elapsed + pause >= servers.retry_s:
            break
        servers.sleep(pause)
        wait = min(wait * RETRY_GROWTH, RETRY_MAX_WAIT_S)
    failure = f"no server answered: {'; '.join(last_error.values())} (not checked: {tries} tries in {elapsed:.1f} s)"
    for i in pending:
        outcomes[i] = (items[i], None, failure)
    return outcomes
