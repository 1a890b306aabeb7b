"""Limits on the custom concept set (finding 5), checked by the CLI and by the server alike.

One implementation (served/safety_checker_served/concept_set.py, installed beside
the postprocessor) holds them: at most MAX_CONCEPTS concepts, a file of at
most MAX_FILE_BYTES (a larger one is not even read), at most
MAX_SOURCE_IMAGES hashes and MAX_TEXT_CHARS of phrase per concept, and
messages and log lines cut at MAX_MESSAGE_CHARS whatever the file held.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import awaited_log, serving

from safety_checker_admin.errors import ServerError
from safety_checker_admin.server import TritonServer, free_port
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
    MAX_VERSION,
    ConceptSet,
    ConceptSetError,
)

COMMAND = str(Path(sys.executable).parent / "safety-checker")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
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


# -- issue 18: versions are bounded (finding 9); a concept file never takes the server down (finding 8) ------
NESTED = "[" * 100000 + "]" * 100000


def with_version(version: int) -> str:
    return json.dumps(dict(concepts(2).to_json(), version=version))


def test_finding_9_versions_are_json_exact_integers():
    """2**63 (answered as -9223372036854775808 once, then every later version refused) and 2**53 are refused by
    the parser the CLI and the server share; 2**53 - 1 is the largest version, and nothing comes after it."""
    for version in (2**63, 2**53, -1):
        with pytest.raises(ConceptSetError, match=r"version must be a whole number in \[0, 2\*\*53 - 1\]"):
            concept_set.parse(with_version(version), DIM)
    largest = concept_set.parse(with_version(MAX_VERSION), DIM)
    assert largest.version == MAX_VERSION == 2**53 - 1
    with pytest.raises(ConceptSetError, match="version"):
        largest.without("c0000")  # the next version would be past the bound: a clear error, never a wrap-around
    with pytest.raises(ConceptSetError, match="nested too deeply"):
        concept_set.parse(NESTED, DIM)


def test_finding_9_the_cli_refuses_a_version_past_the_bound(tmp_path):
    folder = tmp_path / "concepts"
    folder.mkdir()
    path = folder / spec.CUSTOM_CONCEPTS_FILENAME
    for version in (2**63, 2**53):
        path.write_text(with_version(version))
        for command in (
            ["concepts", "list", "--concepts-dir", str(folder)],
            ["concepts", "restore", str(path), "--concepts-dir", str(folder), "--url", "127.0.0.1:1", "--no-wait"],
        ):
            result = subprocess.run([COMMAND, *command], capture_output=True, text=True, timeout=120)
            assert result.returncode != 0 and result.stdout == "", (command, result.stdout)
            assert "2**53 - 1" in result.stderr and "Traceback" not in result.stderr, (command, result.stderr)
    path.write_text(with_version(MAX_VERSION))
    listed = subprocess.run(
        [COMMAND, "concepts", "list", "--concepts-dir", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0 and str(MAX_VERSION) in listed.stdout, listed.stderr


def rejected_count(server) -> float:
    """The postprocessor's counter of rejected concept files, from the metrics port."""
    with _HTTP.open(f"http://127.0.0.1:{server.ports['metrics']}/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.findall(r"^safety_checker_concept_set_rejected_total(?:\{[^}]*\})? (\S+)$", text, flags=re.M)
    assert len(found) == 1, text[-3000:]
    return float(found[0])


def served_copy(repository: Path, tmp_path: Path):
    copy = shutil.copytree(repository, tmp_path / "repository", ignore=shutil.ignore_patterns(".*"))
    return copy, copy / spec.POSTPROCESS_MODEL / "1" / spec.CUSTOM_CONCEPTS_FILENAME


def answer(server, pixels, protocol: str = "grpc"):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with SafetyCheckerClient(url, protocol=protocol) as client:
        return client.check_batch(pixels)[0]


def until_served(server, pixels, version: int) -> bool:
    return any(answer(server, pixels).concept_set_version == version for _ in range(50))


@pytest.mark.server
def test_finding_8_a_live_concept_file_that_breaks_the_parser_keeps_the_last_good_set(repository, parity_set, tmp_path):
    """Through a real tritonserver: the file replaced by `[` * 100000 + `]` * 100000 (and by bytes that are not
    UTF-8) under a running server: every answer still uses the last good set, the counter on the metrics port
    counts each file; at load, such a file stops the model loading with a clear message."""
    copy, path = served_copy(repository, tmp_path)
    pixels = parity_set.pixels[:2]
    started = serving(copy)
    server = next(started)
    try:
        good = concepts(3, version=1)
        concept_writer.write(path, good)
        assert until_served(server, pixels, 1)
        before = rejected_count(server)
        for count, bad in enumerate([NESTED.encode(), b"\xff\xfe" + concept_writer.dumps(good).encode()], 1):
            path.write_bytes(bad)
            for protocol in ("grpc", "http", "grpc", "http"):
                got = answer(server, pixels, protocol)
                assert got.concept_set_version == 1 and list(got.custom_scores) == list(good.names), protocol
            assert rejected_count(server) - before == count
        log = awaited_log(server.log_path, r"still serving version 1: .*not UTF-8")
        assert "nested too deeply" in log and "RecursionError" not in log and "Traceback" not in log
        concept_writer.write(path, concepts(2, version=2))  # a valid, newer set is served again
        assert until_served(server, pixels, 2) and rejected_count(server) - before == 2
    finally:
        next(started, None)

    path.write_text(NESTED)
    with pytest.raises(ServerError) as refused:
        TritonServer(copy, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()).start(120)
    assert "custom concept set rejected: " in str(refused.value) and "nested too deeply" in str(refused.value)
    assert "Traceback" not in str(refused.value)


@pytest.mark.server
def test_finding_9_a_live_server_refuses_an_unbounded_version_and_restore_rolls_back(repository, parity_set, tmp_path):
    """Through a real tritonserver: 2**63 is never served (nor answered negative); `safety-checker concepts restore
    FILE` publishes an older file's concepts as the next version, which the server serves; 2**53 - 1 is answered
    exactly over gRPC and HTTP, and a restore past it is refused with a clear error."""
    copy, path = served_copy(repository, tmp_path)
    pixels = parity_set.pixels[:1]
    older = concepts(2, version=1)
    backup = tmp_path / "backup.json"
    backup.write_text(concept_writer.dumps(older))
    started = serving(copy)
    server = next(started)
    try:
        concept_writer.write(path, older)
        assert until_served(server, pixels, 1)
        newer = concepts(3, version=5, name="d{:04d}")
        concept_writer.write(path, newer)
        assert until_served(server, pixels, 5)
        path.write_text(with_version(2**63))
        assert not until_served(server, pixels, -(2**63)) and answer(server, pixels).concept_set_version == 5

        def restore() -> subprocess.CompletedProcess:
            command = ["concepts", "restore", str(backup), "--repository", str(copy), "--url", server.grpc_url]
            return subprocess.run([COMMAND, *command], capture_output=True, text=True, timeout=180)

        restored = restore()  # also mends the file in place, which does not validate
        assert restored.returncode == 0, restored.stderr
        assert "(version 6)" in restored.stdout and "c0000, c0001" in restored.stdout, restored.stdout
        got = answer(server, pixels)
        assert got.concept_set_version == 6 and list(got.custom_scores) == list(older.names)
        assert concept_set.read(path).names == older.names

        path.write_text(with_version(MAX_VERSION))
        assert until_served(server, pixels, MAX_VERSION)
        assert answer(server, pixels, "http").concept_set_version == MAX_VERSION == 2**53 - 1
        refused = restore()
        assert refused.returncode != 0 and "Traceback" not in refused.stderr and "version" in refused.stderr
        assert answer(server, pixels).concept_set_version == MAX_VERSION
    finally:
        next(started, None)
