"""The scheduler: worker threads prepare files while requests are in flight, until every file has a line.

Worker threads read, hash and preprocess files (Pillow's decoders and
resize, hashlib and numpy release the GIL) while requests of `batch_size`
images are in flight across the servers, as many as each server's window
allows (pacing.py: sized from its answers, or `concurrency` over all). Each
answer, error or skip (a file that is not an image) is written to the report
as it arrives, and a server's first failure is reported as soon as the main
loop wakes. When `stop` is set (Ctrl-C) nothing more is handed out, and the
answers in flight are written.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Set, TextIO, Tuple

from safety_checker_client.client import RECORD_OUTPUTS, CheckResult, SafetyCheckerClient
from safety_checker_client.records import record
from safety_checker_scan import files
from safety_checker_scan.files import Item, path_key
from safety_checker_scan.pacing import MAX_TIMEOUT_S, Pacing, Ticket
from safety_checker_scan.progress import Progress
from safety_checker_scan.report import ReportWriter
from safety_checker_scan.servers import RETRY_S, Failure, Servers, check_items
from safety_checker_scan.tally import ScanResult, Tally

# Requests in flight: None sizes each server's window from its answers (`--concurrency auto`).
DEFAULT_CONCURRENCY: Optional[int] = None
# Images per request: a CPU server with the full-size checker answers 4 in about 2 s, so a request rarely waits
# long behind another; a fast server gets more requests in flight instead, and its batcher joins them.
DEFAULT_BATCH_SIZE = 4
# The main loop wakes at least this often to redraw the progress and notice Ctrl-C.
TICK_S = 0.2


@dataclass
class ScanOptions:
    urls: List[str]
    protocol: str = "grpc"
    concurrency: Optional[int] = DEFAULT_CONCURRENCY  # None: each server's window from its answers
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = max(2, os.cpu_count() or 1)
    mode: str = "float"  # float | uint8 | encoded
    strictness: object = None
    timeout_s: Optional[float] = None  # per attempt; None: from the server's latency, at most MAX_TIMEOUT_S
    copy_to: Optional[str] = None
    move_to: Optional[str] = None
    non_images: str = "skip"  # skip | error


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
        prepare: Optional[Callable[[Item, str], Item]] = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`monotonic` and `sleep` pace the failover and the waits between tries (tests inject a clock)."""
        self.options = options
        self.writer = writer
        self.progress = progress
        self.stop = stop or threading.Event()
        self.warn = warn
        self._monotonic = monotonic
        self._prepare = prepare or partial(files.prepare, non_images=options.non_images)
        retry_s = min(options.timeout_s or RETRY_S, RETRY_S)
        self.servers = Servers(options.urls, make_client or self._client, monotonic, sleep, retry_s)
        self.pacing = Pacing(
            options.urls,
            options.concurrency,
            monotonic,
            self.servers.resting,
            timeout_cap_s=options.timeout_s or MAX_TIMEOUT_S,
            fixed_timeout=options.timeout_s is not None,
        )
        self.tally = Tally()
        self.file_errors = 0
        self._destinations: Set[str] = set()
        # Report lines and the bar on one terminal: take the bar off before each line.
        self._shared_terminal = (
            progress is not None and progress.tty and (writer.out is progress.out or is_tty(writer.out))
        )

    def _client(self, url: str) -> SafetyCheckerClient:
        options = self.options
        # Each request is sent once (deadline 0): the servers' pool fails over and waits between tries. Only what
        # the report shows is requested.
        return SafetyCheckerClient(
            url,
            protocol=options.protocol,
            uint8=options.mode == "uint8",
            encoded=options.mode == "encoded",
            timeout_s=options.timeout_s or MAX_TIMEOUT_S,  # each attempt's own is set as it is sent
            deadline_s=0,
            outputs=RECORD_OUTPUTS,
        )

    def run(self, items: Sequence[Item]) -> ScanResult:
        options = self.options
        started, cpu_started = self._monotonic(), _cpu_s()
        received = 0
        todo = iter(items)
        ready: List[Item] = []
        preparing: Dict[Future, Item] = {}
        in_flight: Dict[Future, Tuple[List[Item], Ticket]] = {}
        exhausted = stopped = False
        prep_pool = ThreadPoolExecutor(options.workers, thread_name_prefix="scan-prepare")
        check_pool = ThreadPoolExecutor(self.pacing.most, thread_name_prefix="scan-check")
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
                # Files prepared ahead: a batch for each place in the windows and one more, and work for the workers.
                buffered = (self.pacing.limit + 1) * options.batch_size + 2 * options.workers
                while not exhausted and len(preparing) + len(ready) < buffered:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                        break
                    if item.error is not None:
                        self._record(item, None, item.error)
                        continue
                    preparing[prep_pool.submit(self._prepare, item, options.mode)] = item
                while not self.stop.is_set() and (
                    len(ready) >= options.batch_size or (ready and exhausted and not preparing)
                ):
                    ticket = self.pacing.take(full=len(ready) >= options.batch_size)
                    if ticket is None:
                        break
                    batch, ready = ready[: options.batch_size], ready[options.batch_size :]
                    check = partial(check_items, self.servers, batch, options.mode, options.strictness, ticket)
                    in_flight[check_pool.submit(check)] = (batch, ticket)
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
                        if item.error is not None or item.skipped is not None:
                            self._record(item, None, item.error)
                        else:
                            ready.append(item)
                    else:
                        batch, ticket = in_flight.pop(future)
                        failure = future.exception()
                        ticket.finish(answered=False)  # a no-op unless its first attempt never ended
                        outcomes = (
                            future.result()
                            if failure is None
                            else [(item, None, f"{type(failure).__name__}: {failure}") for item in batch]
                        )
                        for item, result, error in outcomes:
                            self._record(item, result, error)
                            received += result is not None
                self._report_warnings()
                if self.progress is not None:
                    self.progress.show()
        finally:
            self._report_warnings()
            prep_pool.shutdown(wait=False, cancel_futures=True)
            check_pool.shutdown(wait=False, cancel_futures=True)
            self.servers.close()
        return ScanResult(
            tally=self.tally,
            seconds=self._monotonic() - started,
            this_run=received,
            interrupted=self.stop.is_set(),
            file_errors=self.file_errors,
            cpu_s=_cpu_s() - cpu_started,
            windows=self.pacing.sizes(),
        )

    def _report_warnings(self) -> None:
        for message in self.servers.take_warnings():
            if self.progress is not None:
                self.progress.clear()
            self.warn(message)

    def _record(self, item: Item, result: Optional[CheckResult], error: Optional[Failure]) -> None:
        if item.skipped is not None:
            line = {"path": item.path, "size": item.size, "sha256": item.sha256, "skipped": item.skipped}
        else:
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
            failed = result is None and item.skipped is None
            self.progress.update(done=1, flagged=int(bool(line.get("flagged"))), errors=int(failed))

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
