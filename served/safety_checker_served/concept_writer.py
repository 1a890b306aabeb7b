"""Writing the custom concept set: readable JSON, replaced atomically, never a file the server would refuse."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Union

from safety_checker_served.concept_set import ConceptSet, parse

_PLACEHOLDER = "@@embedding-{}@@"


def dumps(concept_set: ConceptSet) -> str:
    """Indented JSON with each embedding on one line, so the file stays readable."""
    data = concept_set.to_json()
    embeddings = []
    for index, concept in enumerate(data["concepts"]):
        embeddings.append(json.dumps(concept["embedding"]))
        concept["embedding"] = _PLACEHOLDER.format(index)
    text = json.dumps(data, indent=2)
    for index, embedding in enumerate(embeddings):
        text = text.replace(json.dumps(_PLACEHOLDER.format(index)), embedding, 1)
    return text + "\n"


def write(path: Union[str, os.PathLike], concept_set: ConceptSet) -> None:
    """Replace `path` atomically: a reader sees the old file or the new one, never a part.

    The new file is written to a temporary file in the same folder, flushed to
    disk and renamed over the old one (os.replace).
    """
    path = Path(path)
    text = dumps(concept_set)
    parse(text, embedding_dim=concept_set.embedding_dim)  # never write what the server would refuse
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)
