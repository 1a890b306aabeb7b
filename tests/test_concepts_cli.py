"""The concepts commands' defaults and their first contact with a server, without one: make serve's repository and
address by default, and a server that is not there reported at once, after one request.

tests/test_concepts.py runs the commands against a real tritonserver.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fake_tritonclient import FakeTriton, answers

from fixtures.photos import photo_file
from safety_checker_admin.concept_store import ConceptCommandError
from safety_checker_admin.concept_sync import REQUEST_TIMEOUT_S, connect
from safety_checker_admin.server import free_port
from safety_checker_client import cli, spec
from safety_checker_served import concept_set, concept_writer

COMMAND = str(Path(sys.executable).parent / "safety-checker")
# What a command may take to start and fail: a guard against a hang, not what is asserted.
HANG_GUARD_S = 120


def set_file(repository: Path) -> Path:
    return repository / spec.POSTPROCESS_MODEL / spec.POSTPROCESS_VERSION / spec.CUSTOM_CONCEPTS_FILENAME


def repository_with_an_empty_set(root: Path) -> Path:
    """The part of an exported repository the concepts commands read: an empty custom concept set."""
    set_file(root).parent.mkdir(parents=True)
    concept_writer.write(set_file(root), concept_set.empty(16))
    return root


def refusing(*_: object) -> dict:
    raise ConnectionRefusedError(111, "Connection refused")


def test_a_server_that_is_not_there_is_reported_after_one_request():
    triton = FakeTriton(refusing)
    with pytest.raises(ConceptCommandError) as caught:
        connect("127.0.0.1:9", "grpc", triton=triton)
    assert len(triton.requests) == 1, "the first contact is not retried"
    message = str(caught.value)
    assert "127.0.0.1:9" in message and "is a server running there?" in message and "make serve" in message


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_address_defaults_to_where_make_serve_listens(protocol):
    triton = FakeTriton(lambda batch, names, kwargs: answers([False], names))
    client = connect(None, protocol, triton=triton)
    assert client.url == {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}[protocol]
    assert len(triton.requests) == 1
    assert client.deadline_s == REQUEST_TIMEOUT_S, "later requests are retried as any client's are"


def test_a_url_that_is_no_address_is_refused_in_words():
    with pytest.raises(ConceptCommandError, match="--url"):
        connect("ftp://127.0.0.1:8001", "grpc", triton=FakeTriton(refusing))


def test_concepts_add_with_nothing_listening_fails_at_once_on_stderr(tmp_path):
    repository = repository_with_an_empty_set(tmp_path / "repository")
    image = tmp_path / "image.png"
    image.write_bytes(photo_file("coffee", "png"))
    port = free_port()  # nothing listens on it
    result = subprocess.run(
        [COMMAND, "concepts", "add", "--repository", str(repository), "--url", f"127.0.0.1:{port}"]
        + ["--name", "coffee", "--image", str(image)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "is a server running there?" in result.stderr
    assert "Traceback" not in result.stderr
    assert concept_set.read(set_file(repository)).version == 0, "nothing was written"


def test_the_repository_defaults_to_where_make_serve_exports(tmp_path):
    repository_with_an_empty_set(tmp_path / "build" / "repository")
    result = subprocess.run(
        [COMMAND, "concepts", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr
    assert "custom concept set version 0 (build/repository/" in result.stdout


def test_concepts_dir_is_not_mixed_with_the_default_repository(tmp_path, capsys):
    folder = tmp_path / "concepts"
    folder.mkdir()
    concept_writer.write(folder / spec.CUSTOM_CONCEPTS_FILENAME, concept_set.empty(16))
    code = cli.main(["concepts", "add", "--concepts-dir", str(folder), "--name", "gore", "--text", "gore"])
    assert code == 1
    assert "give --threshold" in capsys.readouterr().err, "the phrase's default threshold needs --repository"
