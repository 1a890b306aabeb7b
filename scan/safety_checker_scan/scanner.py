"""The scheduler: worker threads prepare files while requests are in flight, until every file has a line.

Worker threads read, hash and preprocess files (Pillow's decoders and
resize, hashlib and numpy release the GIL) while up to `concurrency`
requests of `batch_size` images are in flight across the servers. Each
answer or error is written to the report as it arrives. When `stop` is set
(Ctrl-C) nothing more is handed out, and the answers in flight are written.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, TextIO

from safety_checker_client.client import RECORD_OUTPUTS, CheckResult, SafetyCheckerClient
from safety_checker_client.records import record
from safety_checker_scan.files import Item, path_key, prepare
from safety_checker_scan.progress import Progress
from safety_checker_scan.report import ReportWriter
from safety_checker_scan.servers import Failure, Servers, check_items
from safety_checker_scan.tally import ScanResult, Tally

DEFAULT_CONCURRENCY = 8
DEFAULT_BATCH_SIZE = 8
DEFAULT_TIMEOUT_S = 600.0  # per request: a scan is batch work, and a CPU server queues many images
# How long one server's client may retry a request (with backoff) before the scan sends it to the next server.
FAILOVER_S = 30.0
# The main loop wakes at least this often to redraw the progress and notice Ctrl-C.
TICK_S = 0.2


@dataclass
class ScanOptions:
    urls: List[str]
    protocol: str = "grpc"
    concurrency: int = DEFAULT_CONCURRENCY
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = max(2, os.cpu_count() or 1)
    mode: str = "float"  # float | uint8 | encoded
    strictness: object = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    copy_to: Optional[str] = None
    move_to: Optional[str] = None


class Scanner:
    """Runs one scan: prepares files in worker threads and keeps requests in flight until every file has a line."""

    def __init__(
        self,
        options: ScanOptions,
        writer: ReportWriter,
        progress: Optional[Progress] = None,
        make_client: Optional[Callable[[str], object]] = None,
        stop: Optional[threading.Event] = None,
        warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
        monotonic: Callable[[], float] = time.monotonic,
        prepare: Callable[[Item, str], Item] = prepare,
    ) -> None:
        self.options = options
        self.writer = writer
        self.progress = progress
        self.stop = stop or threading.Event()
        self.warn = warn
        self._monotonic = monotonic
        self._prepare = prepare
        self.servers = Servers(options.urls, make_client or self._client, monotonic)
        self.tally = Tally()
        self.file_errors = 0
        self._destinations: Set[str] = set()
        # Report lines and the bar on one terminal: take the bar off before each line.
        self._shared_terminal = (
            progress is not None and progress.tty and (writer.out is progress.out or is_tty(writer.out))
        )

    def _client(self, url: str) -> SafetyCheckerClient:
        options = self.options
        # The client retries a failed request with backoff for up to FAILOVER_S; then the scan sends its images
        # to another server. Only what the report shows is requested.
        return SafetyCheckerClient(
            url,
            protocol=options.protocol,
            uint8=options.mode == "uint8",
            encoded=options.mode == "encoded",
            timeout_s=options.timeout_s,
            deadline_s=min(options.timeout_s, FAILOVER_S),
            outputs=RECORD_OUTPUTS,
        )

    def run(self, items: Sequence[Item]) -> ScanResult:
        options = self.options
        started, cpu_started = self._monotonic(), _cpu_s()
        received = 0
        todo = iter(items)
        ready: List[Item] = []
        preparing: Dict[Future, Item] = {}
        in_flight: Dict[Future, List[Item]] = {}
        buffered = options.concurrency * options.batch_size + 2 * options.workers
        exhausted = stopped = False
        prep_pool = ThreadPoolExecutor(options.workers, thread_name_prefix="scan-prepare")
        check_pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="scan-check")
        try:
            while True:
                if self.stop.is_set() and not stopped:
                    exhausted = stopped = True
                    for future in preparing:
                        future.cancel()
                    preparing.clear()
                    ready.clear()  # read but not sent: --resume checks them
                    if self.progress is not None:
                        self.progress.clear()
                    self.warn(
                        f"interrupted: writing the answers of {len(in_flight)} requests in flight "
                        "(Ctrl-C again to abandon them); --resume checks the rest"
                    )
                while not exhausted and len(preparing) + len(ready) < buffered:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                        break
                    if item.error is not None:
                        self._record(item, None, item.error)
                        continue
                    preparing[prep_pool.submit(self._prepare, item, options.mode)] = item
                while (
                    not self.stop.is_set()
                    and len(in_flight) < options.concurrency
                    and (len(ready) >= options.batch_size or (ready and exhausted and not preparing))
                ):
                    batch, ready = ready[: options.batch_size], ready[options.batch_size :]
                    future = check_pool.submit(check_items, self.servers, batch, options.mode, options.strictness)
                    in_flight[future] = batch
                if not preparing and not in_flight and (exhausted and (not ready or self.stop.is_set())):
                    break
                done, _ = wait([*preparing, *in_flight], timeout=TICK_S, return_when=FIRST_COMPLETED)
                for future in done:
                    if future in preparing:
                        item = preparing.pop(future)
                        if stopped:
                            continue
                        failure = future.exception()
                        if failure is not None:  # prepare() catches what it expects; anything else is an error too
                            item.error = f"cannot read {item.path!r}: {type(failure).__name__}: {failure}"
                        if item.error is not None:
                            self._record(item, None, item.error)
                        else:
                            ready.append(item)
                    else:
                        batch = in_flight.pop(future)
                        failure = future.exception()
                        outcomes = (
                            future.result()
                            if failure is None
                            else [(item, None, f"{type(failure).__name__}: {failure}") for item in batch]
                        )
                        for item, result, error in outcomes:
                            self._record(item, result, error)
                            received += result is not None
                if self.progress is not None:
                    self.progress.show()
        finally:
            prep_pool.shutdown(wait=False, cancel_futures=True)
            check_pool.shutdown(wait=False, cancel_futures=True)
            self.servers.close()
        return ScanResult(
            tally=self.tally,
            seconds=self._monotonic() - started,
            this_run=received,
            skipped=0,
            interrupted=self.stop.is_set(),
            file_errors=self.file_errors,
            cpu_s=_cpu_s() - cpu_started,
        )

    def _record(self, item: Item, result: Optional[CheckResult], error: Optional[Failure]) -> None:
        line = record(item.path, result, error, size=item.size, sha256=item.sha256)
        item.data = None
        location = None
        if result is not None and result.flagged and (self.options.copy_to or self.options.move_to):
            location = self._set_aside(item)
        if self.progress is not None and self._shared_terminal:
            self.progress.clear()
        self.writer.write(line)
        self.tally.add(line, location)
        if self.progress is not None:
            self.progress.update(done=1, flagged=int(bool(line.get("flagged"))), errors=int(result is None))

    def _set_aside(self, item: Item) -> Optional[str]:
        """Copy or move a flagged file into the chosen folder; returns where it is now."""
        folder = self.options.copy_to or self.options.move_to
        if item.root is not None:
            relative = os.path.relpath(item.path, item.root)
        else:
            relative = os.path.basename(item.path)
        target = _free_name(os.path.join(folder, relative), self._destinations)
        self._destinations.add(path_key(target))
        try:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            if self.options.move_to:
                shutil.move(item.path, target)
            else:
                shutil.copy2(item.path, target)
        except OSError as error:
            self.file_errors += 1
            verb = "move" if self.options.move_to else "copy"
            if self.progress is not None:
                self.progress.clear()
            self.warn(f"error: cannot {verb} flagged {item.path!r} to {target!r}: {error}")
            return item.path if self.options.copy_to else None
        return target if self.options.move_to else item.path


def _free_name(target: str, taken: Set[str]) -> str:
    """`target`, or `name-1.ext`, `name-2.ext`, ... if a file is there or another flagged file goes there."""
    stem, extension = os.path.splitext(target)
    candidate, number = target, 0
    while os.path.lexists(candidate) or path_key(candidate) in taken:
        number += 1
        candidate = f"{stem}-{number}{extension}"
    return candidate


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
