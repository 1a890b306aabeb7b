"""The scan's report: one record per file (the client's record schema), as JSON lines or CSV by the extension.

Each line is written and flushed as its answer arrives (and a file is
fsynced every second), so an interrupted scan loses nothing; `read_report`
reads back every complete line, for `--resume`.

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
import time
from typing import Dict, List, Optional, TextIO

from safety_checker_client.client import ANSWER_FIELDS

# One line per file, in this order; the CSV header.
REPORT_FIELDS = ("path", "size", "sha256", *ANSWER_FIELDS, "error")  # size in bytes
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
    def open(cls, path: Optional[str], resume: bool) -> ReportWriter:
        if path is None:
            return cls(sys.stdout, ".jsonl", header=False, owned=False)
        kind = report_format(path)
        fresh = not (resume and os.path.exists(path) and os.path.getsize(path) > 0)
        if not fresh:
            _drop_partial_last_line(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        newline = "" if kind == ".csv" else None
        out = open(path, "w" if fresh else "a", newline=newline, encoding="utf-8", errors="surrogateescape")
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
    for name in _BOOLEAN_COLUMNS:
        if row.get(name) in ("true", "false"):
            record[name] = row[name] == "true"
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
    newline = "" if kind == ".csv" else None
    with open(path, newline=newline, encoding="utf-8", errors="surrogateescape") as handle:
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
