"""`safety-checker scan`: check a whole tree of images as fast as the servers answer.

How it keeps the servers busy: worker threads read, hash and preprocess files
(Pillow's decoders and resize, hashlib and numpy release the GIL) while up to
`--concurrency` requests of `--batch-size` images are in flight, handed out
round-robin across every `--url`. A request whose server fails (refused
connection, timeout, a server that stops) is sent again to another server,
each server at most once per request; a server that failed is skipped for a
few seconds (longer each time it fails again). A request that a server
refuses as invalid is split, and each image is retried alone, so that one bad
image cannot take others down with it. Only an image some server answered is
ever reported with `flagged`; every other file gets a line with `error`.

The report (JSON lines or CSV, by the extension) gets one line per file,
written and flushed as its answer arrives, in the order answers arrive. With
`--resume`, files that already have an answer in the report are skipped;
files that only have an error line there are checked again and get a new
line (the last line for a path is the one that counts).

Ctrl-C stops handing out work, waits for the requests in flight and writes
their answers, so nothing the servers checked is lost and `--resume` checks
every remaining image exactly once; a second Ctrl-C abandons the requests in
flight.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from array import array
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, TextIO, Tuple

import numpy as np

from safety_checker_client import spec
from safety_checker_client.client import DEFAULT_URLS, PROTOCOLS, CheckError, CheckResult, SafetyCheckerClient
from safety_checker_client.preprocess import ImageError, decode_image, normalize, preprocess_uint8
from safety_checker_client.progress import Progress, duration

# One line per file, in this order; the CSV header.
REPORT_FIELDS = (
    "path",
    "size",  # bytes
    "sha256",
    "flagged",
    "fired_concepts",
    "concept_scores",
    "special_scores",
    "custom_scores",
    "concept_set_version",
    "strictness_adjustment",
    "error",
)
REPORT_FORMATS = (".jsonl", ".csv")
# CSV columns holding JSON text (lists and objects).
_JSON_COLUMNS = ("fired_concepts", "concept_scores", "special_scores", "custom_scores")

DEFAULT_CONCURRENCY = 8
DEFAULT_BATCH_SIZE = 8
DEFAULT_TIMEOUT_S = 600.0  # per request: a scan is batch work, and a CPU server queues many images
# A server that failed is skipped this long, doubled at each further failure up to the maximum.
COOLDOWN_S = 5.0
MAX_COOLDOWN_S = 60.0
# The main loop wakes at least this often to redraw the progress and notice Ctrl-C.
TICK_S = 0.2

MODES = ("float", "uint8", "encoded")
# fired_concepts names the special-care concepts so; they are not counted per concept.
SPECIAL_CARE_PREFIX = "special_care_"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FLAGGED = 3
EXIT_INTERRUPTED = 130

EPILOG = """\
exit status:
  0    every image was checked (and, with --fail-on-flagged, none was flagged)
  1    any error: a file could not be read or was not answered (its report
       line has "error" and never "flagged"), or a flagged file could not be
       copied or moved; this wins over 3
  2    wrong arguments
  3    with --fail-on-flagged: every image was checked and at least one was
       flagged (in this run or, with --resume, already in the report)
  130  interrupted (Ctrl-C or SIGTERM): the answers in flight were written;
       run again with --resume to check the rest

Folders are walked recursively and every file in them is checked (a file that
is not an image gets an error line: nothing in the tree is skipped silently).
PATH may also be a file, a glob ('photos/**/*.png', quoted) or '-' for a list
of paths, one per line, on stdin. Without --report the report goes to stdout
(JSON lines) and the progress to stderr; with --report the progress and the
summary go to stdout. A progress bar is drawn on a terminal, plain lines
every few seconds otherwise.
"""


# -- the report ---------------------------------------------------------------


def report_record(
    path: str,
    size: Optional[int],
    sha256: Optional[str],
    result: Optional[CheckResult] = None,
    error: Optional[str] = None,
) -> Dict[str, object]:
    """One report line: every field for an answer; path, size, sha256 and error (no `flagged`) otherwise."""
    record: Dict[str, object] = {"path": path, "size": size, "sha256": sha256}
    if result is None:
        record["error"] = error or "not checked"
        return record
    record.update(
        flagged=result.flagged,
        fired_concepts=result.fired_concepts,
        concept_scores=result.concept_scores,
        special_scores=result.special_scores,
        custom_scores=result.custom_scores,
        concept_set_version=result.concept_set_version,
        strictness_adjustment=result.strictness_adjustment,
        error=None,
    )
    return record


def report_format(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension not in REPORT_FORMATS:
        raise ValueError(f"the report must end in {' or '.join(REPORT_FORMATS)}, not {path!r}")
    return extension


class ReportWriter:
    """Writes report lines to a file or stdout and flushes each one (and fsyncs a file every second)."""

    def __init__(self, out: TextIO, kind: str, header: bool, owned: bool) -> None:
        self.out = out
        self.kind = kind
        self.owned = owned
        self._csv = csv.DictWriter(out, fieldnames=REPORT_FIELDS, lineterminator="\n") if kind == ".csv" else None
        self._synced = time.monotonic()
        if self._csv is not None and header:
            self._csv.writeheader()
            self.out.flush()

    @classmethod
    def open(cls, path: Optional[str], resume: bool) -> ReportWriter:
        if path is None:
            return cls(sys.stdout, ".jsonl", header=False, owned=False)
        kind = report_format(path)
        fresh = not (resume and os.path.exists(path) and os.path.getsize(path) > 0)
        if not fresh:
            _drop_partial_last_line(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        out = open(path, "w" if fresh else "a", newline="" if kind == ".csv" else None, encoding="utf-8")
        return cls(out, kind, header=fresh, owned=True)

    def write(self, record: Dict[str, object]) -> None:
        if self._csv is not None:
            self._csv.writerow(_csv_row(record))
        else:
            self.out.write(json.dumps(record) + "\n")
        self.out.flush()
        if self.owned and time.monotonic() - self._synced > 1.0:
            os.fsync(self.out.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self.out.flush()
        if self.owned:
            os.fsync(self.out.fileno())
            self.out.close()


def _csv_row(record: Dict[str, object]) -> Dict[str, str]:
    row = {}
    for name in REPORT_FIELDS:
        value = record.get(name)
        if value is None:
            row[name] = ""
        elif isinstance(value, bool):
            row[name] = "true" if value else "false"
        elif name in _JSON_COLUMNS:
            row[name] = json.dumps(value)
        else:
            row[name] = str(value)
    return row


def _from_csv_row(row: Dict[str, str]) -> Dict[str, object]:
    record: Dict[str, object] = {"path": row.get("path", "")}
    for name in ("size", "concept_set_version"):
        if row.get(name):
            record[name] = int(row[name])
    if row.get("sha256"):
        record["sha256"] = row["sha256"]
    if row.get("flagged") in ("true", "false"):
        record["flagged"] = row["flagged"] == "true"
    for name in _JSON_COLUMNS:
        if row.get(name):
            record[name] = json.loads(row[name])
    if row.get("strictness_adjustment"):
        record["strictness_adjustment"] = float(row["strictness_adjustment"])
    record["error"] = row.get("error") or None
    return record


def _drop_partial_last_line(path: str) -> None:
    """A scan killed mid-write leaves half a line; cut it so appended lines start on their own."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        step = 65536
        position = size
        while position > 0:
            start = max(0, position - step)
            handle.seek(start)
            chunk = handle.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return
            position = start
        handle.truncate(0)


def read_report(path: str) -> List[Dict[str, object]]:
    """Every complete line of a JSON-lines or CSV report, as records (CSV values converted back)."""
    if not os.path.exists(path):
        return []
    kind = report_format(path)
    records: List[Dict[str, object]] = []
    with open(path, newline="" if kind == ".csv" else None, encoding="utf-8") as handle:
        if kind == ".csv":
            text = handle.read()
            if not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is not None and tuple(reader.fieldnames) != REPORT_FIELDS:
                raise ValueError(f"{path} is not a scan report (its header is {reader.fieldnames})")
            records = [_from_csv_row(row) for row in reader]
        else:
            for line in handle:
                if not line.endswith("\n"):
                    break  # cut short by an interrupted write
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "path" in record:
                    records.append(record)
    return records


def answered(record: Dict[str, object]) -> bool:
    """A line with an answer: `flagged` is true or false and there is no error."""
    return isinstance(record.get("flagged"), bool) and not record.get("error")


# -- the files ------------------------------------------------------------------


def path_key(path: str) -> str:
    """What identifies a file across runs (resume, exclusions): its absolute, normalised path."""
    return os.path.normcase(os.path.abspath(path))


@dataclass
class Item:
    """One file to check."""

    path: str  # as reported
    root: Optional[str] = None  # the folder it was found in by walking (for --copy/--move-flagged)
    error: Optional[str] = None  # known not checkable before reading it
    size: Optional[int] = None
    sha256: Optional[str] = None
    data: Optional[np.ndarray] = field(default=None, repr=False)  # what is sent: uint8 or float32 pixels


def _walk(root: str, skip: Set[str]) -> Iterator[Item]:
    """Every file under `root`, sorted, following links to folders once; unlistable folders are errors."""
    seen: Set[Tuple[int, int]] = set()
    failures: List[OSError] = []
    for folder, folders, files in os.walk(root, followlinks=True, onerror=failures.append):
        while failures:
            failed = failures.pop(0)
            yield Item(failed.filename or folder, root, error=f"cannot list folder {failed.filename!r}: {failed}")
        try:
            status = os.stat(folder)
        except OSError as error:
            yield Item(folder, root, error=f"cannot list folder {folder!r}: {error}")
            folders[:] = []
            continue
        if (status.st_dev, status.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        folders[:] = sorted(f for f in folders if path_key(os.path.join(folder, f)) not in skip)
        for name in sorted(files):
            path = os.path.join(folder, name)
            if path_key(path) not in skip:
                yield Item(path, root)
    for failed in failures:
        yield Item(failed.filename or root, root, error=f"cannot list folder {failed.filename!r}: {failed}")


def expand(operands: Sequence[str], stdin: Optional[TextIO] = None, skip: Iterable[str] = ()) -> Iterator[Item]:
    """The files named by folders (walked), files, globs and '-' (paths on stdin), each once."""
    skip = set(skip)
    seen: Set[str] = set()

    def operand_items(operand: str, literal: bool) -> Iterator[Item]:
        if os.path.isdir(operand):
            yield from _walk(operand, skip)
        elif os.path.lexists(operand) or literal or not glob.has_magic(operand):
            yield Item(operand)
        else:
            matches = sorted(glob.glob(operand, recursive=True))
            if not matches:
                yield Item(operand, error=f"no file matches {operand!r}")
            for match in matches:
                if os.path.isdir(match):
                    yield from _walk(match, skip)
                elif path_key(match) not in skip:
                    yield Item(match)

    for operand in operands:
        if operand == "-":
            lines = (line.rstrip("\r\n") for line in (stdin or sys.stdin))
            sources = [(line, True) for line in lines if line.strip()]
        else:
            sources = [(operand, False)]
        for source, literal in sources:
            for item in operand_items(source, literal):
                key = path_key(item.path)
                if key in seen:
                    continue
                seen.add(key)
                yield item


def prepare(item: Item, mode: str) -> Item:
    """Read, hash and (except for `encoded`) preprocess one file, in a worker thread; errors land on the item."""
    try:
        if not os.path.exists(item.path):
            raise ImageError(f"no such file: {item.path!r}")
        if not os.path.isfile(item.path):
            raise ImageError(f"not a regular file: {item.path!r}")
        with open(item.path, "rb") as handle:
            data = handle.read()
    except (OSError, ImageError) as error:
        item.error = str(error) if isinstance(error, ImageError) else f"cannot read {item.path!r}: {error}"
        return item
    item.size = len(data)
    item.sha256 = hashlib.sha256(data).hexdigest()
    if mode == "encoded":
        return item  # the file's bytes go to the server untouched
    try:
        pixels = preprocess_uint8([decode_image(data, item.path)])
        item.data = (pixels if mode == "uint8" else normalize(pixels))[0]
    except ImageError as error:
        item.error = str(error)
    except Exception as error:  # Pillow raises more than it documents on hostile files; never "not flagged"
        item.error = f"cannot read image file {item.path!r}: {type(error).__name__}: {error}"
    return item


# -- the servers ------------------------------------------------------------------


def refused(error: CheckError) -> bool:
    """The server answered that the request is invalid (the images' fault), rather than failing itself."""
    cause = error.__cause__  # tritonclient's exception, perhaps behind the client's own CheckError naming a file
    while cause is not None:
        status = getattr(cause, "status", None)
        if callable(status):
            return status() in ("StatusCode.INVALID_ARGUMENT", "400")
        cause = cause.__cause__
    return False


# How long one server gets to answer a request, retries included, before the scan tries another.
FAILOVER_S = 30.0


class Servers:
    """Round-robin over URLs with one client per thread and URL; servers that fail are skipped for a while."""

    def __init__(self, urls: Sequence[str], make_client: Callable[[str], object]) -> None:
        self.urls = list(urls)
        self.make_client = make_client
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
            now = time.monotonic()
            rotated = self.urls[start:] + self.urls[:start]
            up = [u for u in rotated if self._down_until[u] <= now]
            return up + [u for u in rotated if u not in up]

    def client(self, url: str):
        clients = getattr(self._local, "clients", None)
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
            self._down_until[url] = time.monotonic() + self._cooldown[url]
            self._cooldown[url] = min(self._cooldown[url] * 2, MAX_COOLDOWN_S)
        clients = getattr(self._local, "clients", {})
        client = clients.pop(url, None)
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


Outcome = Tuple[Item, Optional[CheckResult], Optional[str]]


def check_items(servers: Servers, items: List[Item], mode: str, strictness) -> List[Outcome]:
    """Answers for a batch: tried on each server at most once; refused batches are split into single images."""
    errors: List[str] = []
    for url in servers.order():
        try:
            client = servers.client(url)
            if mode == "encoded":
                results = client.check_files([item.path for item in items], strictness=strictness)
            else:
                results = client.check_batch(np.stack([item.data for item in items]), strictness)
            if len(results) != len(items):
                raise CheckError(f"{url} answered {len(results)} of {len(items)} images")
        except CheckError as error:
            if refused(error):
                if len(items) > 1:
                    return [outcome for item in items for outcome in check_items(servers, [item], mode, strictness)]
                return [(items[0], None, str(error))]
            servers.failed(url)
            errors.append(str(error))
            continue
        except Exception as error:  # anything unexpected: the images are not checked, and say why
            return [(item, None, f"{type(error).__name__}: {error}") for item in items]
        servers.answered(url)
        return [(item, result, None) for item, result in zip(items, results)]
    return [(item, None, "no server answered: " + "; ".join(errors)) for item in items]


# -- the tally: what the summary and the page show -------------------------------


@dataclass
class Flagged:
    path: str
    location: str  # where the file is now (after --move-flagged)
    fired: List[str]
    top_score: float


@dataclass
class Tally:
    checked: int = 0
    flagged: int = 0
    errors: int = 0
    per_concept: Dict[str, int] = field(default_factory=dict)
    top_scores: array = field(default_factory=lambda: array("d"))  # per answered image
    flagged_images: List[Flagged] = field(default_factory=list)
    error_lines: List[Tuple[str, str]] = field(default_factory=list)

    def add(self, record: Dict[str, object], location: Optional[str] = None) -> None:
        if not answered(record):
            self.errors += 1
            self.error_lines.append((str(record.get("path")), str(record.get("error"))))
            return
        self.checked += 1
        top = top_score(record)
        self.top_scores.append(top)
        if record["flagged"]:
            self.flagged += 1
            fired = list(record.get("fired_concepts") or [])
            for name in fired:
                if not name.startswith(SPECIAL_CARE_PREFIX):  # they never flag an image on their own
                    self.per_concept[name] = self.per_concept.get(name, 0) + 1
            path = str(record["path"])
            self.flagged_images.append(Flagged(path, location or path, fired, top))


def top_score(record: Dict[str, object]) -> float:
    """The image's highest score over the concepts that can flag it (built-in and custom); > 0 flags."""
    scores = list(record.get("concept_scores") or []) + list((record.get("custom_scores") or {}).values())
    return max(scores) if scores else math.nan


# -- the scan -------------------------------------------------------------------------


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


@dataclass
class ScanResult:
    tally: Tally
    seconds: float
    this_run: int  # answers received in this run
    skipped: int  # already answered in the report
    interrupted: bool = False
    file_errors: int = 0  # flagged files that could not be copied or moved
    cpu_s: float = 0.0  # this process's CPU time (every thread) during the run

    @property
    def images_per_s(self) -> float:
        return self.this_run / self.seconds if self.seconds > 0 else 0.0


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
    ) -> None:
        self.options = options
        self.writer = writer
        self.progress = progress
        self.stop = stop or threading.Event()
        self.warn = warn
        self.servers = Servers(options.urls, make_client or self._client)
        self.tally = Tally()
        self.file_errors = 0
        self._destinations: Set[str] = set()
        # Report lines and the bar on one terminal: take the bar off before each line.
        self._shared_terminal = (
            progress is not None and progress.tty and (writer.out is progress.out or _is_tty(writer.out))
        )

    def _client(self, url: str):
        options = self.options
        # The client retries a refused (UNAVAILABLE: a full queue) or failed request with backoff for up to
        # FAILOVER_S; after that the scan retries its images on another server.
        return SafetyCheckerClient(
            url,
            protocol=options.protocol,
            uint8=options.mode == "uint8",
            encoded=options.mode == "encoded",
            timeout_s=options.timeout_s,
            deadline_s=min(options.timeout_s, FAILOVER_S),
        )

    def run(self, items: Sequence[Item]) -> ScanResult:
        options = self.options
        started, cpu_started = time.monotonic(), _cpu_s()
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
                    preparing[prep_pool.submit(prepare, item, options.mode)] = item
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
            seconds=time.monotonic() - started,
            this_run=received,
            skipped=0,
            interrupted=self.stop.is_set(),
            file_errors=self.file_errors,
            cpu_s=_cpu_s() - cpu_started,
        )

    def _record(self, item: Item, result: Optional[CheckResult], error: Optional[str]) -> None:
        record = report_record(item.path, item.size, item.sha256, result, error)
        item.data = None
        location = None
        if result is not None and result.flagged and (self.options.copy_to or self.options.move_to):
            location = self._set_aside(item)
        if self.progress is not None and self._shared_terminal:
            self.progress.clear()
        self.writer.write(record)
        self.tally.add(record, location)
        if self.progress is not None:
            self.progress.update(done=1, flagged=int(bool(record.get("flagged"))), errors=int(result is None))

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


# -- the command ------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(commands, strictness_type: Callable[[str], object]) -> argparse.ArgumentParser:
    """The `scan` subcommand on the `safety-checker` command's subparsers."""
    scan = commands.add_parser(
        "scan",
        help="check a tree of images fast: many requests in flight, a report, a summary",
        description="Check every image under PATH... with the served checker: many requests in flight across\n"
        "one or more servers, one report line per file, a summary at the end.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("paths", nargs="+", metavar="PATH", help="folder (walked recursively), file, glob, or -")
    scan.add_argument(
        "--url",
        action="append",
        dest="urls",
        metavar="URL",
        help=f"HOST:PORT of a server; repeat for several (default {DEFAULT_URLS['grpc']} for gRPC, "
        f"{DEFAULT_URLS['http']} for HTTP)",
    )
    scan.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    scan.add_argument(
        "--concurrency",
        type=_positive,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight, over all servers (default {DEFAULT_CONCURRENCY})",
    )
    scan.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH_SIZE,
        metavar="B",
        help=f"images per request (default {DEFAULT_BATCH_SIZE}; larger ones are split at the served max_batch_size)",
    )
    scan.add_argument(
        "--workers",
        type=_positive,
        default=ScanOptions.workers,
        metavar="W",
        help=f"threads reading and preprocessing files (default {ScanOptions.workers}: the cores, at least 2)",
    )
    form = scan.add_mutually_exclusive_group()
    form.add_argument(
        "--uint8", action="store_true", help="send resized uint8 images to safety_checker_uint8 (4x fewer bytes)"
    )
    form.add_argument(
        "--encoded",
        action="store_true",
        help="send each file's bytes untouched to safety_checker_images, which decodes them on the server",
    )
    scan.add_argument(
        "--strictness",
        type=strictness_type,
        metavar="PRESET|NUMBER",
        help=f"a preset ({', '.join(spec.STRICTNESS_PRESETS)}) or an adjustment in "
        f"[-{spec.MAX_STRICTNESS_ADJUSTMENT:g}, {spec.MAX_STRICTNESS_ADJUSTMENT:g}] "
        "(default: the server's configured preset)",
    )
    scan.add_argument(
        "--report",
        metavar="FILE.jsonl|FILE.csv",
        help="write the report here (default: JSON lines on stdout); replaced unless --resume",
    )
    scan.add_argument(
        "--resume",
        action="store_true",
        help="skip files that already have an answer in --report, append the rest",
    )
    aside = scan.add_mutually_exclusive_group()
    aside.add_argument("--copy-flagged", metavar="DIR", help="copy each flagged file into DIR")
    aside.add_argument("--move-flagged", metavar="DIR", help="move each flagged file into DIR")
    scan.add_argument(
        "--html",
        metavar="FILE",
        help="write a self-contained page for a moderator: summary, per-concept counts, score histogram, "
        "flagged images blurred until clicked",
    )
    scan.add_argument("--fail-on-flagged", action="store_true", help="exit with status 3 when any image was flagged")
    scan.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"per request (default {DEFAULT_TIMEOUT_S:g})",
    )
    scan.set_defaults(run=run)
    return scan


def _usage_error(args: argparse.Namespace) -> Optional[str]:
    if args.resume and not args.report:
        return "--resume needs --report FILE"
    if args.report:
        try:
            report_format(args.report)
        except ValueError as error:
            return str(error)
    strictness = args.strictness
    if isinstance(strictness, str) and strictness not in spec.STRICTNESS_PRESETS:
        return f"--strictness: unknown preset {strictness!r} (one of {', '.join(spec.STRICTNESS_PRESETS)})"
    if isinstance(strictness, float) and not abs(strictness) <= spec.MAX_STRICTNESS_ADJUSTMENT:
        return (
            f"--strictness: an adjustment must be in [-{spec.MAX_STRICTNESS_ADJUSTMENT:g}, "
            f"{spec.MAX_STRICTNESS_ADJUSTMENT:g}], got {strictness:g}"
        )
    if args.timeout <= 0:
        return "--timeout must be positive"
    return None


def run(args: argparse.Namespace) -> int:
    """`safety-checker scan`; returns the exit status (see EPILOG)."""
    problem = _usage_error(args)
    if problem:
        print(f"safety-checker scan: error: {problem}", file=sys.stderr)
        return 2
    urls = args.urls or [DEFAULT_URLS[args.protocol]]
    mode = "encoded" if args.encoded else "uint8" if args.uint8 else "float"
    options = ScanOptions(
        urls=urls,
        protocol=args.protocol,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        workers=args.workers,
        mode=mode,
        strictness=args.strictness,
        timeout_s=args.timeout,
        copy_to=args.copy_flagged,
        move_to=args.move_flagged,
    )
    human = sys.stdout if args.report else sys.stderr

    skip = {path_key(p) for p in (args.report, args.html) if p}
    skip |= {path_key(p) for p in (args.copy_flagged, args.move_flagged) if p}
    earlier: Dict[str, Dict[str, object]] = {}
    if args.resume:
        try:
            for record in read_report(args.report):
                if answered(record):
                    earlier[path_key(str(record["path"]))] = record
        except (OSError, ValueError) as error:
            print(f"error: cannot resume from {args.report}: {error}", file=sys.stderr)
            return EXIT_ERROR
    try:
        writer = ReportWriter.open(args.report, args.resume)
    except OSError as error:
        print(f"error: cannot write the report {args.report}: {error}", file=sys.stderr)
        return EXIT_ERROR
    items: List[Item] = []
    previous = Tally()
    try:
        for item in expand(args.paths, sys.stdin, skip):
            record = earlier.get(path_key(item.path))
            if record is not None and item.error is None:
                previous.add(record)
            else:
                items.append(item)
    except KeyboardInterrupt:
        writer.close()
        print("interrupted while listing the files; nothing was checked", file=sys.stderr)
        return EXIT_INTERRUPTED

    progress = Progress(human, len(items), tty=_is_tty(human))
    stop = threading.Event()
    scanner = Scanner(options, writer, progress, stop=stop, warn=lambda m: print(m, file=sys.stderr, flush=True))

    def interrupt(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    handled = (signal.SIGINT, signal.SIGTERM)
    saved = {sig: signal.signal(sig, interrupt) for sig in handled} if _main_thread() else {}
    try:
        progress.show(force=True)
        result = scanner.run(items)
    except KeyboardInterrupt:
        progress.clear()
        writer.close()
        print("abandoned the requests in flight; --resume checks them again", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)  # worker threads may be waiting on the network: do not join them
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    progress.close()
    writer.close()
    result.skipped = previous.checked
    total = merge(previous, result.tally)

    if args.html:
        from safety_checker_client.html_report import write_page

        try:
            write_page(args.html, total, result, options, report=args.report)
        except OSError as error:
            print(f"error: cannot write {args.html}: {error}", file=sys.stderr)
            result.file_errors += 1
    for line in summary_lines(total, result, args.report, args.html):
        print(line, file=human)
    human.flush()

    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.tally.errors or result.file_errors:
        return EXIT_ERROR
    if args.fail_on_flagged and total.flagged:
        return EXIT_FLAGGED
    return EXIT_OK


def merge(first: Tally, second: Tally) -> Tally:
    merged = Tally(
        checked=first.checked + second.checked,
        flagged=first.flagged + second.flagged,
        errors=first.errors + second.errors,
        top_scores=array("d", first.top_scores) + second.top_scores,
        flagged_images=first.flagged_images + second.flagged_images,
        error_lines=first.error_lines + second.error_lines,
    )
    for tally in (first, second):
        for name, count in tally.per_concept.items():
            merged.per_concept[name] = merged.per_concept.get(name, 0) + count
    return merged


def summary_lines(
    total: Tally, result: ScanResult, report: Optional[str] = None, html: Optional[str] = None
) -> List[str]:
    """The summary: images checked, flagged (per concept), errors, images/s."""
    files = total.checked + total.errors
    lines = [
        f"scanned {files} files: {total.checked} images checked, {total.flagged} flagged, {total.errors} errors"
        + (" (interrupted)" if result.interrupted else ""),
        f"this run: {result.this_run} images checked in {duration(result.seconds)} "
        f"({result.images_per_s:.{3 if result.images_per_s < 10 else 2}f} images/s, client CPU {result.cpu_s:.2f} s)"
        + (f"; {result.skipped} already checked in {report}" if result.skipped else ""),
    ]
    if total.per_concept:
        counts = sorted(total.per_concept.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append("flagged per concept: " + ", ".join(f"{name} {count}" for name, count in counts))
    if result.file_errors:
        lines.append(f"files not copied or moved: {result.file_errors} (see the errors above)")
    if report:
        lines.append(f"report: {report}")
    if html:
        lines.append(f"page: {html}")
    return lines


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
