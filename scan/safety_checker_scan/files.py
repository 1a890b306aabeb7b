"""The files a scan checks: the operands expanded (folders walked, globs, stdin), filtered, then each read once.

`--include`/`--exclude` globs choose among the files by their path relative
to the folder they were found in (`Filters`). `prepare` reads a file once, in
a worker thread: it hashes those bytes, tells a file that is not an image
(`sniff`), and either keeps the bytes to send as they are (`--encoded`) or
decodes and preprocesses them, so the report's sha256 is always of what was
checked.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Pattern, Sequence, Set, TextIO, Tuple, Union

import numpy as np

from safety_checker_client.preprocess import ImageError, decode_image, normalize, preprocess_uint8
from safety_checker_scan.sniff import not_an_image

MODES = ("float", "uint8", "encoded")
NON_IMAGES = ("skip", "error")  # what a file that is not an image gets: a "skipped" line, or an error line


def path_key(path: str) -> str:
    """What identifies a file across runs (resume, exclusions): its absolute, normalised path."""
    return os.path.normcase(os.path.abspath(path))


@dataclass
class Item:
    """One file to check."""

    path: str  # as reported
    root: Optional[str] = None  # the folder it was found in by walking (for --copy/--move-flagged)
    error: Optional[str] = None  # known not checkable before reading it
    skipped: Optional[str] = None  # why it was not checked though nothing failed: it is not an image
    size: Optional[int] = None
    sha256: Optional[str] = None
    # What is sent: the file's bytes (encoded), or its uint8 or float32 pixels.
    data: Union[bytes, np.ndarray, None] = field(default=None, repr=False)


def _class_end(pattern: str, start: int) -> int:
    """Where the `[...]` opening at `start` closes (a `]` first in it, or after `!`, is a member); -1: it does not."""
    j = start + 1
    j += pattern[j : j + 1] == "!"
    j += pattern[j : j + 1] == "]"
    return pattern.find("]", j)


def _glob_regex(pattern: str) -> Pattern[str]:
    """A glob as a regex over '/'-separated paths: `*`, `?` and `[...]` stay within a folder, `**` crosses them."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[" and _class_end(pattern, i) > 0:
            end = _class_end(pattern, i)
            inner = re.sub(r"([\\&~|])", r"\\\1", pattern[i + 1 : end])  # re's set operators taken literally
            inner = "^" + inner[1:] if inner.startswith("!") else "\\" + inner if inner.startswith("^") else inner
            parts.append("(?!/)[" + inner + "]")
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


class Filters:
    """`--include`/`--exclude`: which files to check, by their path relative to the folder they were found in.

    A pattern without '/' is matched against the name alone (at any depth); one with '/' (a leading one too)
    against the whole relative path. A file is checked when it matches an include (if any is given) and no
    exclude; a folder matching an exclude is not walked. Counts what it left out, for the summary.
    """

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.include = [self._compiled(p) for p in include]
        self.exclude = [self._compiled(p) for p in exclude]
        self.files = 0  # files left out
        self.folders = 0  # folders not walked

    @staticmethod
    def _compiled(pattern: str) -> Tuple[bool, Pattern[str]]:
        """(whether it matches the whole relative path, its regex): a leading '/' anchors it, a trailing one is
        dropped."""
        pattern = pattern.rstrip("/") or pattern
        return "/" in pattern, _glob_regex(pattern.lstrip("/"))

    @staticmethod
    def _matches(patterns: List[Tuple[bool, Pattern[str]]], relative: str) -> bool:
        relative = relative.replace(os.sep, "/")
        name = relative.rsplit("/", 1)[-1]
        return any(regex.match(relative if whole else name) for whole, regex in patterns)

    def wants_file(self, relative: str) -> bool:
        wanted = (not self.include or self._matches(self.include, relative)) and not self._matches(
            self.exclude, relative
        )
        self.files += not wanted
        return wanted

    def wants_folder(self, relative: str) -> bool:
        wanted = not self._matches(self.exclude, relative)
        self.folders += not wanted
        return wanted


def _walk(root: str, skip: Set[str], filters: Filters, base: Optional[str] = None) -> Iterator[Item]:
    """Every file under `root` that `filters` wants (by its path relative to `base`, default `root`), sorted,
    following links to folders once; unlistable folders are errors."""
    base = root if base is None else base
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
        folders[:] = sorted(
            f
            for f in folders
            if path_key(os.path.join(folder, f)) not in skip
            and filters.wants_folder(os.path.relpath(os.path.join(folder, f), base))
        )
        for name in sorted(files):
            path = os.path.join(folder, name)
            if path_key(path) not in skip and filters.wants_file(os.path.relpath(path, base)):
                yield Item(path, root)
    for failed in failures:
        yield Item(failed.filename or root, root, error=f"cannot list folder {failed.filename!r}: {failed}")


def _fixed_folder(pattern: str) -> str:
    """The folder a glob's matches are below: its leading folders without wildcards."""
    folders = pattern.replace(os.sep, "/").split("/")[:-1]
    fixed = []
    for part in folders:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def expand(
    operands: Sequence[str],
    stdin: Optional[TextIO] = None,
    skip: Iterable[str] = (),
    filters: Optional[Filters] = None,
) -> Iterator[Item]:
    """The files named by folders (walked), files, globs and '-' (paths on stdin) that `filters` wants, each once.

    A file named itself is matched by its name; a glob's match by its path below the glob's fixed folder."""
    skip = set(skip)
    filters = filters or Filters()
    seen: Set[str] = set()

    def operand_items(operand: str, literal: bool) -> Iterator[Item]:
        if os.path.isdir(operand):
            yield from _walk(operand, skip, filters)
        elif os.path.lexists(operand) or literal or not glob.has_magic(operand):
            if filters.wants_file(os.path.basename(operand)):
                yield Item(operand)
        else:
            matches = sorted(glob.glob(operand, recursive=True))
            if not matches:
                yield Item(operand, error=f"no file matches {operand!r}")
            fixed = _fixed_folder(operand)
            for match in matches:
                if os.path.isdir(match):
                    if filters.wants_folder(os.path.relpath(match, fixed)):
                        yield from _walk(match, skip, filters, base=fixed)
                elif path_key(match) not in skip and filters.wants_file(os.path.relpath(match, fixed)):
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


def prepare(item: Item, mode: str, non_images: str = "skip") -> Item:
    """Read (once), hash and, except for `encoded`, preprocess one file; errors land on the item, and so does
    `skipped` for a file that is not an image (with `non_images="skip"`; an error line otherwise)."""
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
    reason = not_an_image(data, item.path)
    if reason is not None:
        if non_images == "skip":
            item.skipped = reason
        else:
            item.error = f"cannot read image file {item.path!r}: {reason}"
        return item
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
