"""The files a scan checks: the operands expanded (folders walked, globs, stdin), then each read once.

`prepare` reads a file once, in a worker thread: it hashes those bytes and
either keeps them to send as they are (`--encoded`) or decodes and
preprocesses them, so the report's sha256 is always of what was checked.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Set, TextIO, Tuple, Union

import numpy as np

from safety_checker_client.preprocess import ImageError, decode_image, normalize, preprocess_uint8

MODES = ("float", "uint8", "encoded")


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
    # What is sent: the file's bytes (encoded), or its uint8 or float32 pixels.
    data: Union[bytes, np.ndarray, None] = field(default=None, repr=False)


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
    """Read (once), hash and, except for `encoded`, preprocess one file; errors land on the item."""
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
        item.data = data  # sent untouched: the very bytes just hashed
        return item
    try:
        pixels = preprocess_uint8([decode_image(data, item.path)])
        item.data = (pixels if mode == "uint8" else normalize(pixels))[0]
    except ImageError as error:
        item.error = str(error)
    except Exception:  # Pillow raises more than it documents on hostile files; never "not flagged"
        item.error = f"cannot read image file {item.path!r}: corrupt or truncated image file"
    return item
