"""The concept file a `safety-checker concepts` command works on: found, read, changed under a lock, exported.

Every change is validated with the module the server reads the file with
(safety_checker_served.concept_set) and written atomically (temporary file +
os.replace, under a lock so two commands cannot lose each other's change). A
file that does not validate is never modified: the error names the problem
and where it is, and the server keeps serving the last valid set meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from safety_checker_client import spec
from safety_checker_served import concept_set, concept_writer
from safety_checker_served.concept_set import ConceptSet, ConceptSetError


class ConceptCommandError(RuntimeError):
    """A concepts command that could not do what was asked; nothing was changed unless the message says so."""


def concept_file(args: argparse.Namespace) -> Path:
    """The concept file the command works on: in --repository's postprocessor, or in --concepts-dir (the folder
    a deployment mounts into every replica, e.g. a ConfigMap's source)."""
    if getattr(args, "concepts_dir", None) is not None:
        path = Path(args.concepts_dir) / spec.CUSTOM_CONCEPTS_FILENAME
        if not path.is_file():
            raise ConceptCommandError(
                f"{path} does not exist: start the folder from an exported repository's set, e.g. cp "
                f"REPOSITORY/{spec.POSTPROCESS_MODEL}/{spec.POSTPROCESS_VERSION}/{spec.CUSTOM_CONCEPTS_FILENAME} "
                f"{args.concepts_dir}/"
            )
        return path
    repository = Path(args.repository)
    if not repository.is_dir():
        raise ConceptCommandError(f"model repository not found: {repository}")
    path = repository / spec.POSTPROCESS_MODEL / spec.POSTPROCESS_VERSION / spec.CUSTOM_CONCEPTS_FILENAME
    if not path.is_file():
        raise ConceptCommandError(
            f"{path} does not exist: is {repository} a model repository written by `python -m export`? "
            "(a repository exported before custom concepts existed must be exported again)"
        )
    return path


def read_set(path: Path) -> ConceptSet:
    try:
        return concept_set.read(path)
    except ConceptSetError as error:
        raise ConceptCommandError(
            f"{error}. Not modifying it: fix the file by hand (or restore it from a backup); until then the "
            "server keeps serving the last valid set"
        ) from None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the concept file between commands (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, os.replace still keeps every write whole
        yield
        return
    with open(path.parent / f".{path.name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def change(path: Path, edit: Callable[[ConceptSet], ConceptSet]) -> ConceptSet:
    """Apply `edit` to the set in `path` and write the result, under the lock; the new set."""
    with locked(path):
        current = read_set(path)  # again, under the lock: another command may have changed it
        try:
            new = edit(current)
            concept_writer.write(path, new)
        except ConceptSetError as error:
            raise ConceptCommandError(str(error)) from None
        except OSError as error:
            raise ConceptCommandError(f"cannot write {path}: {error}") from None
    return new


def restore(path: Path, older: ConceptSet, served_version: int) -> ConceptSet:
    """`older`'s concepts written to `path` as a version newer than the file's and `served_version` (a server takes
    only a newer version), under the lock. A file that does not validate is replaced: a rollback is what mends it."""
    with locked(path):
        try:
            current = concept_set.read(path, older.embedding_dim)
        except ConceptSetError:
            current = concept_set.empty(older.embedding_dim)
        if current.version < served_version:
            current = dataclasses.replace(current, version=served_version)
        try:
            new = current.restored(older)
            concept_writer.write(path, new)
        except ConceptSetError as error:
            raise ConceptCommandError(str(error)) from None
        except OSError as error:
            raise ConceptCommandError(f"cannot write {path}: {error}") from None
    return new


def builtin_thresholds(repository: Optional[Path]) -> List[float]:
    """The thresholds of the built-in concepts, from the repository's concepts.json."""
    if repository is None:
        raise ConceptCommandError(
            "give --threshold: the default for a phrase (the mean built-in threshold) is read from --repository"
        )
    path = Path(repository) / spec.POSTPROCESS_MODEL / spec.POSTPROCESS_VERSION / spec.CONCEPTS_FILENAME
    try:
        return [float(c["threshold"]) for c in json.loads(path.read_text())["concepts"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConceptCommandError(f"cannot read the built-in thresholds from {path}: {error}") from None


def configmap(name: str, namespace: Optional[str], text: str) -> str:
    """A ConfigMap manifest holding `text` as custom_concepts.json, byte for byte (a YAML literal block)."""
    metadata = f"  name: {json.dumps(name)}\n" + (f"  namespace: {json.dumps(namespace)}\n" if namespace else "")
    body = text.rstrip("\n")
    trailing = len(text) - len(body)
    chomping = {0: "-", 1: ""}.get(trailing, "+")  # keep exactly the file's final newlines
    block = "".join(f"    {line}\n" if line else "\n" for line in body.split("\n")) + "\n" * max(trailing - 1, 0)
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n{metadata}data:\n"
        f"  {spec.CUSTOM_CONCEPTS_FILENAME}: |2{chomping}\n{block}"
    )
