"""The scan's report: one record per file (the client's record schema), as JSON lines or CSV by the extension.

Each line is written and flushed as its answer arrives (and a file is
fsynced every second), so an interrupted scan loses nothing; `read_report`
reads back every complete line, for `--resume`, which first rewrites the
report atomically with the records it keeps (`newest`), so that a report
holds at most one line per path at every moment.

A file name need not be UTF-8 (Python holds its other bytes as lone
surrogates, PEP 383). The report keeps such a path usable, the name's exact
bytes: JSON lines write them as the escapes `\\udcXX` (JSON's own syntax,
which Python, and so `--resume`, reads back as the same path); CSV writes the
bytes themselves. What a person reads (the summary, the HTML page) shows them
as U+FFFD (`shown`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, TextIO

from safety_checker_client.client import ANSWER_FIELDS

# One line per file, in this order; the CSV header. "skipped" says why a file that is not an image was not checked.
REPORT_FIELDS = ("path", "size", "sha256", *ANSWER_FIELDS, "error", "skipped")  # size in bytes
_FIELDS_BEFORE_SKIPPED = REPORT_FIELDS[:-1]  # the header of a report written before "skipped": resumable
REPORT_FORMATS = (".jsonl", ".csv")
# CSV columns holding JSON text (lists and objects), and those holding true/false.
_JSON_COLUMNS = ("fired_concepts", "concept_scores", "special_scores", "custom_scores", "view")
_BOOLEAN_COLUMNS = ("flagged", "exact_scores")


def shown(text: str) -> str:
    """`text` for a person to read: the bytes of a file name that are not UTF-8 (lone surrogates) as U+FFFD."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to (one read from a report, say)
        data = text.encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "replace")


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
    def open(cls, path: Optional[str], keep: Optional[Iterable[Dict[str, object]]] = None) -> ReportWriter:
        """A writer to `path` (None: stdout). Without `keep` the report is replaced; with it (--resume) it is first
        rewritten atomically with those records only, and new lines are appended."""
        if path is None:
            return cls(sys.stdout, ".jsonl", header=False, owned=False)
        kind = report_format(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        newline = "" if kind == ".csv" else None
        if keep is None:
            out = open(path, "w", newline=newline, encoding="utf-8", errors="surrogateescape")
            return cls(out, kind, header=True, owned=True)
        replace_atomically(path, lambda handle: _write_all(cls(handle, kind, header=True, owned=False), keep))
        out = open(path, "a", newline=newline, encoding="utf-8", errors="surrogateescape")
        return cls(out, kind, header=False, owned=True)

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
    for name in _BOOLEAN_COLUMNS:
        if row.get(name) in ("true", "false"):
            record[name] = row[name] == "true"
    for name in _JSON_COLUMNS:
        if row.get(name):
            record[name] = json.loads(row[name])
    if row.get("strictness_adjustment"):
        record["strictness_adjustment"] = float(row["strictness_adjustment"])
    record["error"] = row.get("error") or None
    if row.get("skipped"):
        record["skipped"] = row["skipped"]
    return record


def _write_all(writer: ReportWriter, records: Iterable[Dict[str, object]]) -> None:
    for line in records:
        writer.write(line)


def replace_atomically(path: str, fill: Callable[[TextIO], None]) -> None:
    """Write a new `path` beside it and rename it over the old one: a reader sees the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".scan-", suffix=os.path.splitext(path)[1])
    try:
        newline = "" if path.lower().endswith(".csv") else None
        with os.fdopen(fd, "w", newline=newline, encoding="utf-8", errors="surrogateescape") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def newest(records: Iterable[Dict[str, object]], key: Callable[[str], str]) -> Dict[str, Dict[str, object]]:
    """The last record of each path (by `key`), in the order the paths first appear: the one that counts."""
    latest: Dict[str, Dict[str, object]] = {}
    for line in records:
        latest[key(str(line["path"]))] = line
    return latest


def read_report(path: str) -> List[Dict[str, object]]:
    """Every complete line of a JSON-lines or CSV report, as records (CSV values converted back)."""
    if not os.path.exists(path):
        return []
    kind = report_format(path)
    records: List[Dict[str, object]] = []
    newline = "" if kind == ".csv" else None
    with open(path, newline=newline, encoding="utf-8", errors="surrogateescape") as handle:
        if kind == ".csv":
            text = handle.read()
            if not text.endswith("\n"):
                text = text[: text.rfind("\n") + 1]
            reader = csv.DictReader(io.StringIO(text))
            header = tuple(reader.fieldnames or REPORT_FIELDS)
            if header not in (REPORT_FIELDS, _FIELDS_BEFORE_SKIPPED):
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
