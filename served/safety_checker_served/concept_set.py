"""The custom concept set: a versioned, human-readable JSON file in the model repository.

This module is the one definition of that file. The served postprocessor
reads it with `parse`, and the `safety-checker concepts` commands write it
with `concept_writer`, which parses what it writes first, so the writer and
the server accept exactly the same files. It needs the standard library and
NumPy only.

`custom_concepts.json` (in safety_checker_postprocess/1/; docs/concepts.md):

    {
      "format_version": 1,
      "version": 3,                  # bumped by every change; the server answers with it
      "embedding_dim": 768,          # width of the served image_embeds
      "updated": "2026-01-31T12:00:00+00:00",
      "concepts": [
        {
          "name": "stripes",
          "category": "pattern",
          "source": {"kind": "images", "sha256": ["<64 hex digits>", ...]},   # or {"kind": "text", "text": ...}
          "embedding": [0.0123, ...],    # embedding_dim floats, L2-normalised
          "threshold": 0.8,              # cosine threshold in [-1, 1]
          "created": "2026-01-31"
        }
      ]
    }

A custom concept is scored like a built-in one: round(cosine - threshold +
adjustment, 3), and it fires (and flags the image) when that is > 0.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

FILENAME = "custom_concepts.json"
FORMAT_VERSION = 1
# How far from 1 the stored embedding's L2 norm may be (it is written normalised, as float32 decimals).
NORM_TOLERANCE = 1e-3
THRESHOLD_RANGE = (-1.0, 1.0)
DEFAULT_CATEGORY = "custom"
# Names are used as JSON keys, in the fired list and on the command line: keep them plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CATEGORY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,63}$")
# The built-in concepts' names in the fired list; a custom concept may not take one.
RESERVED_NAME = re.compile(r"^(concept_\d+|special_care_\d+)$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

_TOP_KEYS = {"format_version", "version", "embedding_dim", "updated", "concepts"}
_CONCEPT_KEYS = {"name", "category", "source", "embedding", "threshold", "created"}

# Limits, checked by parse() and read(), so by the CLI and by the server alike: a set beyond them is never
# written and never served (the server keeps the last valid set). Sizes: docs/concepts.md.
MAX_CONCEPTS = 1000
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_SOURCE_IMAGES = 1000  # sha256 hashes of one concept's example images
MAX_TEXT_CHARS = 1000  # a text source's phrase
MAX_VERSION = 2**53 - 1  # JSON's exact integers: every reader, and Triton's INT64 output, gets it back as written
# Messages (and so every log line about a concept set) are cut at this length, lists of names at this many.
MAX_MESSAGE_CHARS = 600
LISTED_NAMES = 20
QUOTE_CHARS = 64


class ConceptSetError(ValueError):
    """A concept set (file or change) that must not be served; the message says what is wrong and where.

    The message is at most MAX_MESSAGE_CHARS long, whatever the file held.
    """

    def __init__(self, message: str) -> None:
        super().__init__(bounded(message))


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters (a log line or a message never grows with a file's content)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(value: Any) -> str:
    return bounded(repr(value), QUOTE_CHARS)


def listing(names: Sequence[str], limit: int = LISTED_NAMES, chars: int = MAX_MESSAGE_CHARS // 2) -> str:
    """'a, b, c' or, for a long list, as many of the first `limit` names as fit in `chars`, and how many more."""
    shown: List[str] = []
    for name in names[:limit]:
        if shown and len(", ".join(shown + [name])) > chars:
            break
        shown.append(name)
    text = ", ".join(shown) or "none"
    return text if len(shown) == len(names) else f"{text} and {len(names) - len(shown)} more"


@dataclass(frozen=True)
class CustomConcept:
    name: str
    category: str
    source: Dict[str, Any]  # {"kind": "text", "text": ...} or {"kind": "images", "sha256": [...]}
    embedding: Tuple[float, ...]
    threshold: float
    created: str

    def to_json(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "source": self.source,
            "embedding": list(self.embedding),
            "threshold": self.threshold,
            "created": self.created,
        }

    def describe_source(self) -> str:
        if self.source["kind"] == "text":
            return f"text {self.source['text']!r}"
        count = len(self.source["sha256"])
        return f"{count} image{'s' if count != 1 else ''}"


@dataclass(frozen=True)
class ConceptSet:
    version: int
    embedding_dim: int
    concepts: Tuple[CustomConcept, ...] = ()
    updated: Optional[str] = None

    @property
    def names(self) -> List[str]:
        return [c.name for c in self.concepts]

    def get(self, name: str) -> Optional[CustomConcept]:
        return next((c for c in self.concepts if c.name == name), None)

    def unit_embeddings(self) -> np.ndarray:
        """float32 [K, D], each row normalised as torch's F.normalize does (what diffusers' cosine_distance uses)."""
        matrix = np.array([c.embedding for c in self.concepts], dtype=np.float32).reshape(-1, self.embedding_dim)
        return normalize_rows(matrix)

    def thresholds(self) -> np.ndarray:
        return np.array([c.threshold for c in self.concepts], dtype=np.float64)

    def same_concepts(self, other: ConceptSet) -> bool:
        return self.embedding_dim == other.embedding_dim and self.concepts == other.concepts

    # -- changes (each returns a new, validated set with the next version) ----
    def with_concept(self, concept: CustomConcept) -> ConceptSet:
        if self.get(concept.name) is not None:
            raise ConceptSetError(
                f"a concept named {concept.name!r} already exists (version {self.version}); "
                "remove it first or choose another name"
            )
        return self._next(self.concepts + (concept,))

    def without(self, name: str) -> ConceptSet:
        if self.get(name) is None:
            raise ConceptSetError(
                f"no concept named {_quote(name)} in the set (version {self.version}); it holds: {listing(self.names)}"
            )
        return self._next(tuple(c for c in self.concepts if c.name != name))

    def with_threshold(self, name: str, threshold: float) -> ConceptSet:
        concept = self.get(name)
        if concept is None:
            raise ConceptSetError(f"no concept named {_quote(name)} in the set (version {self.version})")
        check_threshold(threshold)
        return self._next(tuple(replace(c, threshold=float(threshold)) if c.name == name else c for c in self.concepts))

    def restored(self, older: ConceptSet) -> ConceptSet:
        """`older`'s concepts as the next version (checked against this set's embedding_dim): a rollback, since a
        server takes only a newer version."""
        return self._next(older.concepts)

    def _next(self, concepts: Tuple[CustomConcept, ...]) -> ConceptSet:
        changed = ConceptSet(
            version=self.version + 1,
            embedding_dim=self.embedding_dim,
            concepts=concepts,
            updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        return parse(json.dumps(changed.to_json()), embedding_dim=self.embedding_dim)  # the checks the server runs

    def to_json(self) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "embedding_dim": self.embedding_dim,
            "updated": self.updated,
            "concepts": [c.to_json() for c in self.concepts],
        }


def empty(embedding_dim: int, version: int = 0) -> ConceptSet:
    return ConceptSet(
        version=version,
        embedding_dim=embedding_dim,
        concepts=(),
        updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """x / max(||x||, 1e-12) per row in float32, as torch.nn.functional.normalize."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.sqrt(np.sum(matrix * matrix, axis=-1, keepdims=True, dtype=np.float32))
    return matrix / np.maximum(norms, np.float32(1e-12))


def unit_vector(vectors: np.ndarray) -> np.ndarray:
    """The normalised mean of the normalised rows (float64): one concept from several examples."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms < 1e-12):
        raise ConceptSetError("an example embedding is zero or not finite; it cannot define a direction")
    mean = (vectors / norms).mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm < 1e-6:
        raise ConceptSetError("the example embeddings cancel out (their mean is zero); use examples that agree")
    return mean / norm


def make_concept(
    name: str,
    embedding: Sequence[float],
    threshold: float,
    source: Dict[str, Any],
    category: str = DEFAULT_CATEGORY,
    created: Optional[str] = None,
) -> CustomConcept:
    """A concept from an embedding (normalised here), checked as the file parser checks it."""
    vector = unit_vector(np.asarray(embedding, dtype=np.float64)[np.newaxis])
    concept = CustomConcept(
        name=name,
        category=category,
        source=source,
        embedding=tuple(float(str(v)) for v in vector.astype(np.float32)),  # shortest float32 decimals
        threshold=threshold,
        created=created or _dt.date.today().isoformat(),
    )
    _concept(concept.to_json(), 0, len(vector))
    return concept


def check_threshold(threshold: Any, where: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConceptSetError(f"{where} must be a number, got {_quote(threshold)}")
    low, high = THRESHOLD_RANGE
    if not math.isfinite(threshold) or not low <= threshold <= high:
        raise ConceptSetError(f"{where} {_quote(threshold)} is outside [{low:g}, {high:g}]")
    return float(threshold)


# -- reading -----------------------------------------------------------------
def parse(text: Union[str, bytes], embedding_dim: Optional[int] = None, origin: str = FILENAME) -> ConceptSet:
    """Validate a whole file; ConceptSetError names the first problem (and, for bad JSON, its line and column)."""
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_BYTES:
        raise ConceptSetError(f"{origin} takes {size} bytes, more than the {MAX_FILE_BYTES} a concept set may")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConceptSetError(f"{origin} is not UTF-8 text: {error}") from None
    try:
        return _concept_set(json.loads(text, parse_constant=_reject_constant), embedding_dim)
    except json.JSONDecodeError as error:
        raise ConceptSetError(
            f"{origin} is not valid JSON: line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except ValueError as error:  # what _concept_set found; NaN / Infinity; an integer of too many digits
        raise ConceptSetError(f"{origin}: {error}") from None
    except RecursionError:  # "[" * 100000: deeper than the parser's (or a message's repr's) stack
        raise ConceptSetError(f"{origin}: its arrays or objects are nested too deeply to be read") from None


def read(path: Union[str, os.PathLike], embedding_dim: Optional[int] = None) -> ConceptSet:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = read_limited(handle, str(path))
    except OSError as error:
        raise ConceptSetError(f"cannot read {path}: {error.strerror or error}") from None
    return parse(data, embedding_dim, origin=str(path))


def read_limited(handle: Any, origin: str) -> bytes:
    """An open file's bytes; ConceptSetError, without reading it, if it is larger than MAX_FILE_BYTES."""
    size = os.fstat(handle.fileno()).st_size
    if size > MAX_FILE_BYTES:
        raise ConceptSetError(f"{origin} takes {size} bytes, more than the {MAX_FILE_BYTES} a concept set may")
    data = handle.read(MAX_FILE_BYTES + 1)  # it may have grown since
    if len(data) > MAX_FILE_BYTES:
        raise ConceptSetError(f"{origin} takes more than the {MAX_FILE_BYTES} bytes a concept set may")
    return data


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _concept_set(data: Any, embedding_dim: Optional[int]) -> ConceptSet:
    if not isinstance(data, dict):
        raise ConceptSetError(f"the top level must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConceptSetError(
            f"unknown key(s) {listing([_quote(k) for k in unknown], 5)} (allowed: {', '.join(sorted(_TOP_KEYS))})"
        )
    for key in ("format_version", "version", "embedding_dim", "concepts"):
        if key not in data:
            raise ConceptSetError(f"missing key {key!r}")
    if data["format_version"] != FORMAT_VERSION or isinstance(data["format_version"], bool):
        raise ConceptSetError(f"format_version {_quote(data['format_version'])} is not {FORMAT_VERSION}")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise ConceptSetError(f"version must be a whole number in [0, 2**53 - 1], got {_quote(version)}")
    dim = data["embedding_dim"]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConceptSetError(f"embedding_dim must be a whole number >= 1, got {_quote(dim)}")
    if embedding_dim is not None and dim != embedding_dim:
        raise ConceptSetError(f"embedding_dim {dim} does not match the served image_embeds width {embedding_dim}")
    updated = data.get("updated")
    if updated is not None and not isinstance(updated, str):
        raise ConceptSetError(f"updated must be a string, got {_quote(updated)}")
    items = data["concepts"]
    if not isinstance(items, list):
        raise ConceptSetError(f"concepts must be a list, got {type(items).__name__}")
    if len(items) > MAX_CONCEPTS:
        raise ConceptSetError(f"{len(items)} concepts, more than the {MAX_CONCEPTS} a set may hold")
    concepts = tuple(_concept(item, index, dim) for index, item in enumerate(items))
    seen = set()
    for concept in concepts:
        if concept.name in seen:
            raise ConceptSetError(f"duplicate concept name {concept.name!r}")
        seen.add(concept.name)
    return ConceptSet(version=version, embedding_dim=dim, concepts=concepts, updated=updated)


def _concept(item: Any, index: int, dim: int) -> CustomConcept:
    where = f"concept {index}"
    if not isinstance(item, dict):
        raise ConceptSetError(f"{where} must be a JSON object, got {type(item).__name__}")
    name = item.get("name")
    if isinstance(name, str):
        where = f"concept {index} ({_quote(name)})"
    unknown = sorted(set(item) - _CONCEPT_KEYS)
    if unknown:
        raise ConceptSetError(
            f"{where}: unknown key(s) {listing([_quote(k) for k in unknown], 5)} "
            f"(allowed: {', '.join(sorted(_CONCEPT_KEYS))})"
        )
    missing = sorted(_CONCEPT_KEYS - set(item))
    if missing:
        raise ConceptSetError(f"{where}: missing key(s) {', '.join(missing)}")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConceptSetError(
            f"{where}: name {_quote(name)} must be 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    if RESERVED_NAME.match(name):
        raise ConceptSetError(f"{where}: name {name!r} is reserved for the built-in concepts")
    category = item["category"]
    if not isinstance(category, str) or not CATEGORY_PATTERN.match(category):
        raise ConceptSetError(
            f"{where}: category {_quote(category)} must be 1-64 letters, digits, spaces, '_', '.' or '-'"
        )
    source = _source(item["source"], where)
    threshold = check_threshold(item["threshold"], f"{where}: threshold")
    embedding = item["embedding"]
    if not isinstance(embedding, list):
        raise ConceptSetError(f"{where}: embedding must be a list of {dim} numbers")
    if len(embedding) != dim:
        raise ConceptSetError(f"{where}: embedding has {len(embedding)} values, the served image_embeds have {dim}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in embedding):
        raise ConceptSetError(f"{where}: embedding holds a value that is not a finite number")
    norm = math.sqrt(math.fsum(float(v) * float(v) for v in embedding))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise ConceptSetError(f"{where}: embedding is not L2-normalised (norm {norm:.6g})")
    created = item["created"]
    if not isinstance(created, str) or not _iso_date(created):
        raise ConceptSetError(f"{where}: created {_quote(created)} is not an ISO date (YYYY-MM-DD)")
    return CustomConcept(
        name=name,
        category=category,
        source=source,
        embedding=tuple(float(v) for v in embedding),
        threshold=threshold,
        created=created,
    )


def _source(source: Any, where: str) -> Dict[str, Any]:
    if not isinstance(source, dict) or source.get("kind") not in ("text", "images"):
        raise ConceptSetError(
            f'{where}: source must be {{"kind": "text", "text": ...}} or '
            f'{{"kind": "images", "sha256": [...]}}, got {_quote(source)}'
        )
    if source["kind"] == "text":
        if set(source) != {"kind", "text"} or not isinstance(source["text"], str) or not source["text"].strip():
            raise ConceptSetError(f'{where}: a text source is {{"kind": "text", "text": "<non-empty phrase>"}}')
        if len(source["text"]) > MAX_TEXT_CHARS:
            raise ConceptSetError(
                f"{where}: the text source has {len(source['text'])} characters, more than {MAX_TEXT_CHARS}"
            )
        return {"kind": "text", "text": source["text"]}
    hashes = source.get("sha256")
    if (
        set(source) != {"kind", "sha256"}
        or not isinstance(hashes, list)
        or not hashes
        or not all(isinstance(h, str) and SHA256.match(h) for h in hashes)
    ):
        raise ConceptSetError(
            f'{where}: an image source is {{"kind": "images", "sha256": [<64 lowercase hex '
            "digits>, ...]}} with at least one hash"
        )
    if len(hashes) > MAX_SOURCE_IMAGES:
        raise ConceptSetError(f"{where}: {len(hashes)} image hashes, more than {MAX_SOURCE_IMAGES}")
    return {"kind": "images", "sha256": list(hashes)}


# The forms `date.isoformat()` and `datetime.isoformat()` write. Python 3.11's fromisoformat also takes "20261128",
# "2026-W48" or a "Z" suffix, which the NGC 24.10 Python backend (3.10) refuses: a file the CLI accepted would then
# stop the server from loading it. So the accepted forms are pinned here.
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3}|\.\d{6})?([+-]\d{2}:\d{2})?")


def _iso_date(text: str) -> bool:
    for form, parse_one in ((_ISO_DATE, _dt.date.fromisoformat), (_ISO_DATETIME, _dt.datetime.fromisoformat)):
        if form.fullmatch(text):
            try:
                parse_one(text)
                return True
            except ValueError:
                return False
    return False
