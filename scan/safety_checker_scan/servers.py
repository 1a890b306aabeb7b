"""The scan's servers: round-robin over the URLs, failing over, and resting a server that failed.

The client does the retrying (with backoff, bounded by its deadline) and the
splitting of a batch refused for one image (`check_each`). The pool adds one
thing: images a server did not answer in time go to the next server, each
server at most once per request, and a server that failed rests (COOLDOWN_S,
doubled at each further failure up to MAX_COOLDOWN_S) while the others take
its share. The clock is injected, so tests count tries instead of waiting.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from safety_checker_client.client import CheckResult
from safety_checker_client.errors import CheckError
from safety_checker_scan.files import Item

# A server that failed is skipped this long, doubled at each further failure up to the maximum.
COOLDOWN_S = 5.0
MAX_COOLDOWN_S = 60.0

Failure = Union[CheckError, str]
Outcome = Tuple[Item, Optional[CheckResult], Optional[Failure]]


class Servers:
    """Round-robin over URLs with one client per thread and URL; servers that fail are skipped for a while."""

    def __init__(
        self, urls: Sequence[str], make_client: Callable[[str], object], monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.urls = list(urls)
        self.make_client = make_client
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._turn = 0
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._cooldown = dict.fromkeys(self.urls, COOLDOWN_S)
        self._local = threading.local()
        self._clients: List[object] = []
        self.failures = dict.fromkeys(self.urls, 0)

    def order(self) -> List[str]:
        """Every URL once: the next in turn first, servers resting after a failure last."""
        with self._lock:
            start = self._turn % len(self.urls)
            self._turn += 1
            now = self._monotonic()
            rotated = self.urls[start:] + self.urls[:start]
            up = [u for u in rotated if self._down_until[u] <= now]
            return up + [u for u in rotated if u not in up]

    def client(self, url: str):
        clients: Dict[str, object] = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if url not in clients:
            clients[url] = self.make_client(url)
            with self._lock:
                self._clients.append(clients[url])
        return clients[url]

    def failed(self, url: str) -> None:
        """Rest the server, and start this thread's next request to it on a fresh connection."""
        with self._lock:
            self.failures[url] += 1
            self._down_until[url] = self._monotonic() + self._cooldown[url]
            self._cooldown[url] = min(self._cooldown[url] * 2, MAX_COOLDOWN_S)
        client = getattr(self._local, "clients", {}).pop(url, None)
        if client is not None:
            _close_quietly(client)

    def answered(self, url: str) -> None:
        with self._lock:
            self._down_until[url] = 0.0
            self._cooldown[url] = COOLDOWN_S

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


def check_items(servers: Servers, items: List[Item], mode: str, strictness) -> List[Outcome]:
    """Each item's answer or error: the images a server did not answer go to the next one, each server once."""
    outcomes: List[Outcome] = [(item, None, None) for item in items]
    pending = list(range(len(items)))
    errors: List[str] = []
    for url in servers.order():
        data = [items[i].data for i in pending]
        try:
            answers = servers.client(url).check_each(data if mode == "encoded" else np.stack(data), strictness)
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
                if len(unanswered) == 1:
                    errors.append(str(answer))
            else:
                outcomes[i] = (items[i], None, answer)
        if unanswered:
            servers.failed(url)
        else:
            servers.answered(url)
        pending = unanswered
        if not pending:
            return outcomes
    for i in pending:
        outcomes[i] = (items[i], None, "no server answered: " + "; ".join(errors))
    return outcomes
