"""Limits on the custom concept set (finding 5), checked by the CLI and by the server alike.

One implementation (served/safety_checker_served/concept_set.py, installed beside
the postprocessor) holds them: at most MAX_CONCEPTS concepts, a file of at
most MAX_FILE_BYTES (a larger one is not even read), at most
MAX_SOURCE_IMAGES hashes and MAX_TEXT_CHARS of phrase per concept, and
messages and log lines cut at MAX_MESSAGE_CHARS whatever the file held.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import awaited_log, serving

from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_served import concept_set, concept_writer
from safety_checker_served.concept_set import (
    LISTED_NAMES,
    MAX_CONCEPTS,
    MAX_FILE_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_SOURCE_IMAGES,
    MAX_TEXT_CHARS,
    ConceptSet,
    ConceptSetError,
)

COMMAND = str(Path(sys.executable).parent / "safety-checker")
DIM = 16  # the tiny test checker's projection_dim


def concepts(count: int, version: int = 1, dim: int = DIM, name: str = "c{:04d}") -> ConceptSet:
    rng = np.random.default_rng(count)
    made = tuple(
        concept_set.make_concept(name.format(i), rng.standard_normal(dim), 0.5, {"kind": "text", "text": f"thing {i}"})
        for i in range(count)
    )
    return ConceptSet(version=version, embedding_dim=dim, concepts=made, updated="2026-11-30T12:00:00+00:00")


def test_the_limits_are_what_the_readme_states():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "concepts.md").read_text()
    assert f"{MAX_CONCEPTS:,} concepts" in readme
    assert f"{MAX_FILE_BYTES // (1024 * 1024)} MiB" in readme
    assert f"{MAX_MESSAGE_CHARS} characters" in readme


def test_at_most_max_concepts():
    full = concepts(MAX_CONCEPTS)
    assert len(concept_set.parse(concept_writer.dumps(full), embedding_dim=DIM).concepts) == MAX_CONCEPTS
    with pytest.raises(ConceptSetError, match=f"{MAX_CONCEPTS + 1} concepts, more than the {MAX_CONCEPTS}"):
        concept_set.parse(concept_writer.dumps(concepts(MAX_CONCEPTS + 1)), embedding_dim=DIM)
    # The CLI's own changes go through the same check: a full set takes no more.
    extra = concept_set.make_concept("one_more", np.ones(DIM), 0.5, {"kind": "text", "text": "one more"})
    with pytest.raises(ConceptSetError, match="more than the"):
        full.with_concept(extra)


def test_a_file_over_the_size_limit_is_refused_without_being_read(tmp_path):
    big = tmp_path / spec.CUSTOM_CONCEPTS_FILENAME
    with open(big, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing to read in a second, unless it is read
    with pytest.raises(ConceptSetError, match=f"more than the {MAX_FILE_BYTES}"):
        concept_set.read(big)
    with pytest.raises(ConceptSetError, match="more than the"):
        concept_set.parse(b" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(ConceptSetError, match="more than the"):
        concept_set.parse(" " * (MAX_FILE_BYTES + 1))


def test_source_limits():
    base = concepts(1).concepts[0].to_json()
    for source, message in (
        ({"kind": "text", "text": "x" * (MAX_TEXT_CHARS + 1)}, "more than"),
        ({"kind": "images", "sha256": ["0" * 64] * (MAX_SOURCE_IMAGES + 1)}, "image hashes, more than"),
    ):
        data = {"format_version": 1, "version": 1, "embedding_dim": DIM, "concepts": [dict(base, source=source)]}
        with pytest.raises(ConceptSetError, match=message):
            concept_set.parse(json.dumps(data), embedding_dim=DIM)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(name="n" * 1_000_000),
        lambda c: c.update(category="c" * 1_000_000),
        lambda c: c.update(source={"kind": "other", "blob": "b" * 1_000_000}),
        lambda c: c.update(created="d" * 1_000_000),
        lambda c: c.update({f"unknown_{i}_" + "k" * 1000: 1 for i in range(1000)}),
    ],
    ids=["name", "category", "source", "created", "unknown-keys"],
)
def test_messages_are_bounded_whatever_the_file_holds(edit):
    item = concepts(1).concepts[0].to_json()
    edit(item)
    data = {"format_version": 1, "version": 1, "embedding_dim": DIM, "concepts": [item]}
    with pytest.raises(ConceptSetError) as caught:
        concept_set.parse(json.dumps(data), embedding_dim=DIM)
    assert len(str(caught.value)) <= MAX_MESSAGE_CHARS


def test_listing_names_is_bounded():
    names = [f"name_{i}" for i in range(5000)]
    text = concept_set.listing(names)
    assert text.endswith(f"and {5000 - LISTED_NAMES} more") and text.count(",") == LISTED_NAMES - 1
    long = [f"{'x' * 60}{i}" for i in range(5000)]
    assert len(concept_set.listing(long)) <= MAX_MESSAGE_CHARS // 2 + 30 and concept_set.listing(long).endswith("more")
    missing = concepts(50)
    with pytest.raises(ConceptSetError) as caught:
        missing.without("absent")
    assert "and 30 more" in str(caught.value)


@pytest.mark.parametrize("count", [MAX_CONCEPTS + 1])
def test_the_cli_refuses_a_set_over_the_limit(tmp_path, count):
    folder = tmp_path / "concepts"
    folder.mkdir()
    over = concepts(count)
    # Written by hand (the CLI never writes such a file): the plain dump, without the writer's own check.
    (folder / spec.CUSTOM_CONCEPTS_FILENAME).write_text(json.dumps(over.to_json()))
    for command in (
        ["concepts", "list", "--concepts-dir", str(folder)],
        ["concepts", "export", "--concepts-dir", str(folder), "--configmap", "x"],
        ["concepts", "set-threshold", "--concepts-dir", str(folder), "--url", "127.0.0.1:1", "--no-wait"]
        + ["--name", "c0000", "--threshold", "0.2"],
    ):
        result = subprocess.run([COMMAND, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0, command
        assert f"more than the {MAX_CONCEPTS}" in result.stderr, (command, result.stderr)
        assert result.stdout == "", command


@pytest.mark.server
def test_the_server_never_serves_a_set_over_the_limits(repository, parity_set, tmp_path):
    copy = shutil.copytree(repository, tmp_path / "repository")
    path = copy / spec.POSTPROCESS_MODEL / "1" / spec.CUSTOM_CONCEPTS_FILENAME
    pixels = parity_set.pixels[:1]
    started = serving(copy)
    server = next(started)
    try:

        def answered_version() -> int:
            with SafetyCheckerClient(server.grpc_url) as client:
                return client.check_batch(pixels)[0].concept_set_version

        def served(version: int) -> bool:
            for _ in range(50):  # the postprocessor looks at the file on each batch
                if answered_version() == version:
                    return True
            return False

        concept_writer.write(path, concepts(3, version=1))
        assert served(1)
        # Over the count: refused, version 1 stays.
        path.write_text(json.dumps(concepts(MAX_CONCEPTS + 1, version=2).to_json()))
        assert not served(2) and answered_version() == 1
        # Over the size: refused without being read.
        with open(path, "wb") as handle:
            handle.truncate(MAX_FILE_BYTES + 1)
        assert not served(2) and answered_version() == 1
        # The largest set allowed is served, and an answer carries it in bounded size.
        concept_writer.write(path, concepts(MAX_CONCEPTS, version=3, name="concept-name-{:04d}-" + "x" * 40))
        assert served(3)
        with SafetyCheckerClient(server.grpc_url) as client:
            answer = client.infer(pixels)
        size = len(answer[spec.CUSTOM_SCORES.name][0, 0]) + len(answer[spec.CUSTOM_COSINES.name][0, 0])
        assert size < MAX_CONCEPTS * 200
        log = awaited_log(server.log_path, r"version 3 loaded: 1000 concepts \(concept-name-0000-x+, .* and \d+ more\)")
        assert "more than the" in log  # both refusals were logged ...
        assert max(len(line) for line in log.splitlines()) < MAX_MESSAGE_CHARS + 400  # ... each on a short line
    finally:
        next(started, None)
