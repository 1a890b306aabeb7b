"""A small progress display for `safety-checker scan`: a bar on a terminal, plain periodic lines otherwise.

The scan needs no tqdm: this is the little it uses of one. The caller
updates counts from one thread; `show` redraws at most every `redraw_s` on a
terminal and prints a line every `every_s` elsewhere.
"""

from __future__ import annotations

import shutil
import time
from typing import Callable, Optional, TextIO

BAR_WIDTH = 24


def clock(seconds: Optional[float]) -> str:
    """H:MM:SS or M:SS; "?" when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def duration(seconds: float) -> str:
    """ "12.3 s" under a minute, else as `clock`."""
    return f"{seconds:.1f} s" if seconds < 60 else clock(seconds)


class Progress:
    """Images done of a total, images/s, flagged, errors and ETA."""

    def __init__(
        self,
        out: TextIO,
        total: int,
        tty: bool,
        every_s: float = 5.0,
        redraw_s: float = 0.1,
        label: str = "scan",
        monotonic: Callable[[], float] = time.monotonic,
        columns: Optional[int] = None,
    ) -> None:
        """`monotonic`: the clock rates and redraws follow; `columns`: the terminal's width (None: as it says)."""
        self.out = out
        self.monotonic = monotonic
        self.columns = columns
        self.total = total
        self.tty = tty
        self.every_s = every_s
        self.redraw_s = redraw_s
        self.label = label
        self.done = 0
        self.flagged = 0
        self.errors = 0
        self.started = monotonic()
        self._shown_at = -float("inf")
        self._drawn = False

    def update(self, done: int = 0, flagged: int = 0, errors: int = 0) -> None:
        self.done += done
        self.flagged += flagged
        self.errors += errors

    @property
    def rate(self) -> float:
        elapsed = self.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> Optional[float]:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def text(self) -> str:
        share = self.done / self.total if self.total else 1.0
        counts = f"{self.done}/{self.total} images"
        rest = (
            f"{self.rate:.1f} images/s, flagged {self.flagged}, errors {self.errors}, "
            f"ETA {clock(self.eta()) if self.done < self.total else '0:00'}"
        )
        if not self.tty:
            return f"{self.label}: {counts} ({share:.0%}), {rest}"
        filled = int(round(share * BAR_WIDTH))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return f"{self.label} {share:4.0%} [{bar}] {counts}, {rest}"

    def show(self, force: bool = False) -> None:
        """Redraw the bar (terminal) or print a line (otherwise) if it is time, or if `force`."""
        now = self.monotonic()
        if not force and now - self._shown_at < (self.redraw_s if self.tty else self.every_s):
            return
        self._shown_at = now
        if self.tty:
            width = self.columns or shutil.get_terminal_size((100, 20)).columns
            self.out.write("\r" + self.text()[: max(width - 1, 10)] + "\033[K")
            self._drawn = True
        else:
            self.out.write(self.text() + "\n")
        self.out.flush()

    def clear(self) -> None:
        """Take the bar off the terminal line (before other output goes to the same terminal)."""
        if self.tty and self._drawn:
            self.out.write("\r\033[K")
            self.out.flush()
            self._drawn = False

    def close(self) -> None:
        """The final state: the bar stays on its own line; a last plain line otherwise."""
        self.show(force=True)
        if self.tty:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False
