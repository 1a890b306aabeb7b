"""The served custom concept set: the file, re-read when it changes, and the last valid set kept.

The postprocessor calls `refresh()` once per batch. It stats the file first
(cheap) and, when its device, inode, size or modification time changed,
parses and validates it; a valid, newer set replaces the served one in one
assignment. Anything else (an invalid or older set, and any error at all
while reading, parsing or preparing it: a file nested too deeply for the
parser, one that is not UTF-8, no memory left) keeps the served set: it is
logged and handed to `on_reject`, which the postprocessor counts in a
metric, and the server never fails a request for it. A file rejected
moments after it was written may have been caught half-written in place, so
it is looked at again for a short while. The clocks are injected, so that
tests count what happens instead of waiting for it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Protocol, Tuple

import numpy as np

from safety_checker_served import concept_set
from safety_checker_served.concept_set import ConceptSet

# A file rejected while it was being written in place is looked at again for this long, at most this often.
RECENT_WRITE_S = 2.0
RETRY_INTERVAL_S = 0.25

Signature = Tuple[int, int, int, int]


class Logger(Protocol):
    """What Triton's `pb_utils.Logger` offers."""

    def log_info(self, message: str) -> None: ...

    def log_warn(self, message: str) -> None: ...

    def log_error(self, message: str) -> None: ...


class Snapshot:
    """One validated custom concept set, in the form the postprocessor scores with."""

    def __init__(self, concepts: ConceptSet) -> None:
        self.concepts = concepts
        self.version = concepts.version
        self.names = concepts.names
        self.unit_embeddings: np.ndarray = concepts.unit_embeddings()
        self.thresholds: np.ndarray = concepts.thresholds()


def _reason(error: Exception) -> str:
    """What a log line says about a rejected file: the check's own message, else the error and its kind."""
    if isinstance(error, (concept_set.ConceptSetError, OSError)):
        return str(error)
    return f"it could not be read ({type(error).__name__}: {error})"


class ConceptFileError(RuntimeError):
    """The file exists but no valid set could be read from it at load: there is nothing safe to serve."""


class CustomConceptFile:
    """The custom concept file at `path`; `snapshot` is what is served."""

    def __init__(
        self,
        path: str,
        embedding_dim: int,
        logger: Logger,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_reject: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """`on_reject(reason)`: called once for each file looked at and rejected while a set is served."""
        self.path = path
        self.embedding_dim = embedding_dim
        self.logger = logger
        self.monotonic = monotonic
        self.wall_clock = wall_clock
        self.on_reject = on_reject
        self.seen: Optional[Signature] = None  # of the file last looked at
        self.rejected: Optional[str] = None  # the message of the last rejected file, while it is the one on disk
        self.rejected_file: Optional[Signature] = None  # that file's signature (counted once, however often read)
        self.last_try = 0.0
        self.missing_logged = False
        if not os.path.exists(path):
            # A repository exported before custom concepts existed: serve none until a file appears.
            logger.log_warn(f"no custom concept set at {path}; serving none (version 0)")
            self.snapshot = Snapshot(concept_set.empty(embedding_dim))
            return
        try:
            self.seen, loaded = self._read()
            self.snapshot = Snapshot(loaded)
        except Exception as error:
            # Fail closed: without a last valid set there is nothing safe to serve.
            raise ConceptFileError(concept_set.bounded(f"custom concept set rejected: {_reason(error)}")) from None

    def _read(self) -> Tuple[Signature, ConceptSet]:
        with open(self.path, "rb") as handle:
            signature = _signature(os.fstat(handle.fileno()))
            text = concept_set.read_limited(handle, self.path)
        return signature, concept_set.parse(text, embedding_dim=self.embedding_dim, origin=self.path)

    def refresh(self) -> Snapshot:
        """The set to serve now: the file's, if it changed into a valid, newer set; else the one served."""
        try:
            return self._refresh()
        except Exception as error:  # a fault of the watcher itself must not fail a request either
            self.logger.log_error(
                f"custom concept set not looked at ({type(error).__name__}); still serving version "
                f"{self.snapshot.version}"
            )
            return self.snapshot

    def _refresh(self) -> Snapshot:
        try:
            stat = os.stat(self.path)
        except OSError:
            if not self.missing_logged:
                message = f"custom concept set {self.path} is missing; still serving version {self.snapshot.version}"
                self.logger.log_warn(message)
                self.missing_logged = True
                self.on_reject(message)
            self.seen = None
            return self.snapshot
        self.missing_logged = False
        signature = _signature(stat)
        if signature == self.seen and not self._retry(stat):
            return self.snapshot
        self.last_try = self.monotonic()
        try:
            signature, loaded = self._read()
            served = self.snapshot.concepts
            if loaded.version <= served.version and not (
                loaded.version == served.version and loaded.same_concepts(served)
            ):
                raise concept_set.ConceptSetError(
                    f"{self.path}: version {loaded.version} is not newer than the served version "
                    f'{served.version}; every change must increase "version"'
                )
            fresh = Snapshot(loaded) if loaded.version != served.version else None
        except Exception as error:  # whatever the file did to the parser: the last good set stays
            self._reject(signature, error)
            return self.snapshot
        self.seen = signature
        self.rejected_file = None
        if self.rejected is not None:
            self.rejected = None
            if fresh is None:
                self.logger.log_info(f"custom concept set {self.path} is valid again (version {loaded.version})")
        if fresh is not None:
            self.snapshot = fresh  # one assignment: the next batch sees all of it
            self.logger.log_info(
                concept_set.bounded(
                    f"custom concept set version {loaded.version} loaded: {len(loaded.concepts)} concepts "
                    f"({concept_set.listing(loaded.names)})"
                )
            )
        return self.snapshot

    def _reject(self, signature: Signature, error: Exception) -> None:
        """Log why the file at `signature` is not served (once per message) and report it (once per file)."""
        self.seen = signature
        message = concept_set.bounded(
            f"custom concept set rejected, still serving version {self.snapshot.version}: {_reason(error)}"
        )
        if message != self.rejected:
            self.logger.log_error(message)
        self.rejected = message
        if signature != self.rejected_file:
            self.rejected_file = signature
            self.on_reject(message)

    def _retry(self, stat: os.stat_result) -> bool:
        """A rejected file written moments ago may have been caught half-written in place: look again."""
        return (
            self.rejected is not None
            and self.wall_clock() - stat.st_mtime < RECENT_WRITE_S
            and self.monotonic() - self.last_try > RETRY_INTERVAL_S
        )


def _signature(stat: os.stat_result) -> Signature:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
