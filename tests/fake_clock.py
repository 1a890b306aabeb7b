"""A clock that moves only when slept on: tests count waits instead of waiting."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple


class FakeClock:
    """`monotonic` and `sleep` for code that takes them as arguments.

    `sleep` records each pause and moves the clock on at once; events scheduled with `at` run as the clock
    passes their time; past `until`, `sleep` raises KeyboardInterrupt (what stops a watch loop for real).
    """

    def __init__(self, until: Optional[float] = None) -> None:
        self.now = 0.0
        self.until = until
        self.sleeps: List[float] = []
        self._events: List[Tuple[float, Callable[[], None]]] = []

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Time passes without a sleep (a request that takes this long)."""
        self.now += seconds
        due = [event for event in self._events if event[0] <= self.now]
        self._events = [event for event in self._events if event[0] > self.now]
        for _, action in sorted(due, key=lambda event: event[0]):
            action()

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        if self.until is not None and self.now > self.until:
            raise KeyboardInterrupt

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run `action` once the clock reaches `when`."""
        self._events.append((when, action))
