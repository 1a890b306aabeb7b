"""Issue 21, the client's half, without a server: `--url` with a scheme, a fast and clear failure when nothing
listens (counted on an injected clock), `check -`, `--fail-on-flagged`, strictness refused locally, and a text file
given to `--encoded`. `check` runs in-process with the real client over a fake tritonclient (fake_tritonclient.py);
the same command against a closed port and a real server: test_cli.py."""

from __future__ import annotations

import errno
import io
import json
import socket
import sys
from typing import List

import numpy as np
import pytest
from fake_tritonclient import FakeClock, FakeTriton, UpperBound, answers, numbers
from tritonclient.utils import InferenceServerException

from safety_checker_client import cli
from safety_checker_client import client as client_module
from safety_checker_client.client import CONNECT_DEADLINE_S, SafetyCheckerClient, read_file, server_address
from safety_checker_client.errors import CheckError
from safety_checker_client.preprocess import ImageError

WHERE = "safety_checker at host:1 (grpc)"
GRPC_REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: Failed to connect to remote host: "
    "Connection refused"
)


# -- server_address ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, address",
    [
        ("127.0.0.1:8001", "127.0.0.1:8001"),
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("https://triton.example:443/", "triton.example:443"),
        ("HTTP://triton:8000//", "triton:8000"),
        ("[::1]:8001", "[::1]:8001"),
    ],
)
def test_a_url_loses_its_http_scheme_and_trailing_slash(url, address):
    assert server_address(url) == address


@pytest.mark.parametrize(
    "url, words",
    [
        ("grpc://127.0.0.1:8001", "only http:// or https://"),
        ("ftp://host:21", "only http:// or https://"),
        ("http://host:8000/v2/models", "must be HOST:PORT"),
        ("host:8000/v2", "must be HOST:PORT"),
        ("http://", "must be HOST:PORT"),
        ("https://triton.example", "must be HOST:PORT"),  # no port: tritonclient would pick one the url did not mean
        ("host:99999", "a port in 1-65535"),
        ("host:0", "a port in 1-65535"),
        ("host:http", "must be HOST:PORT"),
        (":::", "must be HOST:PORT"),
        ("a b:1", "must be HOST:PORT"),
    ],
)
def test_another_scheme_or_a_path_is_refused_naming_the_url(url, words):
    with pytest.raises(ValueError, match=words) as caught:
        server_address(url)
    assert repr(url) in str(caught.value)


def test_the_client_strips_the_scheme_itself():
    """So scan, concepts, the drop-in and the gateway, which construct clients, take http:// urls too."""
    seen: List[str] = []

    class Recording(FakeTriton):
        def InferenceServerClient(self, url: str, **kwargs):
            seen.append(url)
            return super().InferenceServerClient(url, **kwargs)

    client = SafetyCheckerClient("http://host:1/", uint8=True, triton=Recording(answering))
    assert client.url == "host:1" and seen == ["host:1"] and "at host:1 (grpc)" in client.where
    assert client.check_batch(uint8_batch([2]))[0].flagged
    with pytest.raises(ValueError, match="'grpc://host:1'"):
        SafetyCheckerClient("grpc://host:1", triton=FakeTriton(answering))


# -- telling a connection that cannot be made from a server that cannot answer now --------------------------------


@pytest.mark.parametrize(
    "exception, unreachable",
    [
        (InferenceServerException(GRPC_REFUSED, status="StatusCode.UNAVAILABLE"), True),
        (InferenceServerException("errors resolving nohost:8001: DNS", status="StatusCode.UNAVAILABLE"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
        (socket.gaierror(-2, "Name or service not known"), True),
        (OSError(errno.EHOSTUNREACH, "No route to host"), True),
        (InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"), False),
        (InferenceServerException("the server is restarting", status="503"), False),
        (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), False),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False),
        (socket.timeout("timed out"), False),
        (InferenceServerException("Connection refused to answer", status="StatusCode.INVALID_ARGUMENT"), False),
    ],
)
def test_a_connection_that_cannot_be_made_is_unreachable_and_unavailable(exception, unreachable):
    error = CheckError.from_exception(exception, WHERE)
    assert error.unreachable == unreachable
    assert error.retryable == (error.kind == "unavailable")
    if unreachable:
        assert error.kind == "unavailable"


# -- the connect deadline, on an injected clock -------------------------------------------------------------------


def answering(batch, names, kwargs):
    """A server that flags even numbers."""
    return answers([n % 2 == 0 for n in numbers(batch)], names)


def uint8_batch(values) -> np.ndarray:
    return np.stack([np.full((224, 224, 3), v, np.uint8) for v in values])


class Script:
    """A server whose requests fail or are answered in turn: "refused" (no connection), "restarting" (an
    UNAVAILABLE answer), "ok"; the last entry repeats. Each request's clock time is kept."""

    def __init__(self, clock: FakeClock, *steps: str) -> None:
        self.clock, self.steps, self.times = clock, list(steps), []

    def __call__(self, batch, names, kwargs):
        self.times.append(self.clock.now)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if step == "refused":
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        if step == "restarting":
            raise InferenceServerException("the server is restarting", status="StatusCode.UNAVAILABLE")
        return answering(batch, names, kwargs)


def scripted(clock: FakeClock, *steps: str, **kwargs):
    script = Script(clock, *steps)
    warnings: List[tuple] = []  # (the clock when told, the message)
    client = SafetyCheckerClient(
        "host:1",
        uint8=True,
        triton=FakeTriton(script),
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=UpperBound(),
        warn=lambda message: warnings.append((clock.now, message)),
        **kwargs,
    )
    return client, script, warnings


def test_nothing_listening_is_said_at_once_and_given_up_on_after_the_connect_deadline():
    clock = FakeClock()
    client, script, warnings = scripted(clock, "refused", deadline_s=120)
    with pytest.raises(CheckError) as caught:
        client.check_batch(uint8_batch([1]))
    # Told before the first wait, naming the address and what comes next.
    assert [at for at, _ in warnings] == [0.0]
    message = warnings[0][1]
    assert (
        message.startswith("cannot reach safety_checker_uint8 at host:1 (grpc): ") and "Connection refused" in message
    )
    assert message.endswith(f"retrying for up to {CONNECT_DEADLINE_S:.0f} s")
    # The waits of the schedule that fit in the connect deadline (20 s), not in the 120 s deadline.
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0] and sum(clock.sleeps) < CONNECT_DEADLINE_S
    assert client.attempts == len(script.times) == 8
    assert caught.value.unreachable and "(not checked: 8 attempts in 17.8 s)" in str(caught.value)
    # The connect deadline counts from the client's first attempt: later requests have what is left of it, then each
    # is sent once, without waiting.
    for _ in range(2):
        with pytest.raises(CheckError):
            client.check_batch(uint8_batch([1]))
    assert clock.sleeps[7:] == [0.25, 0.5, 1.0, 0.25] and sum(clock.sleeps) < CONNECT_DEADLINE_S
    attempts, waits = client.attempts, len(clock.sleeps)
    with pytest.raises(CheckError):
        client.check_batch(uint8_batch([1]))
    assert client.attempts == attempts + 1 and len(clock.sleeps) == waits and len(warnings) == 1


def test_a_server_that_answered_before_is_waited_for_until_the_deadline_through_a_restart():
    clock = FakeClock()
    client, script, warnings = scripted(clock, "ok", "refused", deadline_s=60)
    assert client.check_batch(uint8_batch([2]))[0].flagged
    with pytest.raises(CheckError) as caught:
        client.check_batch(uint8_batch([2]))
    assert sum(clock.sleeps) > CONNECT_DEADLINE_S and sum(clock.sleeps) <= 60
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0] + [5.0] * 10
    assert [message.endswith("retrying for up to 60 s") for _, message in warnings] == [True]
    assert caught.value.unreachable
    # Back again: answered, and a later failure is told again.
    clock, steps = FakeClock(), ("ok", "refused", "ok", "restarting", "ok")
    client, script, warnings = scripted(clock, *steps, deadline_s=60)
    for _ in range(3):
        client.check_batch(uint8_batch([3]))
    assert client.attempts == 5 and len(warnings) == 2
    assert "cannot reach" in warnings[0][1] and warnings[1][1].startswith(
        "safety_checker_uint8 at host:1 (grpc): the server"
    )


def test_a_server_that_answers_it_cannot_answer_now_gets_the_whole_deadline():
    clock = FakeClock()
    client, script, warnings = scripted(clock, "restarting", deadline_s=30)
    with pytest.raises(CheckError) as caught:
        client.check_batch(uint8_batch([1]))
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]  # past 20 s: it is there, restarting
    assert not caught.value.unreachable and len(warnings) == 1


@pytest.mark.parametrize("deadline_s, attempts", [(0, 1), (4, 5)])
def test_a_shorter_deadline_bounds_the_connect_deadline(deadline_s, attempts):
    clock = FakeClock()
    client, script, warnings = scripted(clock, "refused", deadline_s=deadline_s)
    with pytest.raises(CheckError):
        client.check_batch(uint8_batch([1]))
    assert client.attempts == attempts and sum(clock.sleeps) <= deadline_s
    assert len(warnings) == (attempts > 1)  # told only of a failure that will be retried


# -- `check` in-process over the fake tritonclient ----------------------------------------------------------------


@pytest.fixture
def fake_server(monkeypatch):
    """`check` builds its real client as always, over a fake tritonclient and a fake clock; yields (clock, script)."""
    clock = FakeClock()
    state = {}

    def make(*args, **kwargs):
        script = state["script"]
        triton = FakeTriton(script)
        fakes = {"triton": triton, "monotonic": clock.monotonic, "sleep": clock.sleep, "rng": UpperBound()}
        client = SafetyCheckerClient(*args, **fakes, **kwargs)
        state["client"] = client
        return client

    monkeypatch.setattr(client_module, "SafetyCheckerClient", make)

    def serve(*steps: str):
        state["script"] = Script(clock, *steps)
        return state

    return clock, serve


def image_files(tmp_path, *numbers_: int) -> List[str]:
    """Files that stand for their number (the fake server reads an --encoded file's bytes as text)."""
    paths = []
    for number in numbers_:
        path = tmp_path / f"{number}.png"
        path.write_bytes(str(number).encode())
        paths.append(str(path))
    return paths


def run_check(capsys, *args: str):
    status = cli.main(["check", *args])
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


def test_check_with_nothing_listening_writes_to_stderr_at_once_and_exits_1_within_the_connect_deadline(
    fake_server, tmp_path, capsys
):
    clock, serve = fake_server
    state = serve("refused")
    files = image_files(tmp_path, *range(40))  # two requests of at most 32
    status, records, err = run_check(capsys, "--encoded", "--url", "http://127.0.0.1:9", *files)
    assert status == 1
    first, *rest = err.splitlines()
    assert first == (
        "safety-checker check: cannot reach safety_checker_images at 127.0.0.1:9 (grpc): [Errno 111] Connection "
        f"refused; retrying for up to {CONNECT_DEADLINE_S:.0f} s"
    )
    assert rest == ["error: 40 of 40 images were not checked"]
    assert state["script"].times[0] == 0.0  # the first attempt, at once
    assert sum(clock.sleeps) < CONNECT_DEADLINE_S <= 30  # simulated seconds: well within 40
    assert state["client"].attempts == 12  # 8 for the first request, 4 for the second in what was left of 20 s
    assert [r["path"] for r in records] == files and not any("flagged" in r for r in records)


def test_fail_on_flagged_exits_3_as_scan_and_an_unchecked_image_still_exits_1(fake_server, tmp_path, capsys):
    _, serve = fake_server
    serve("ok")
    odd, even = image_files(tmp_path, 1, 2)
    assert run_check(capsys, "--encoded", "--fail-on-flagged", odd)[0] == 0
    status, records, _ = run_check(capsys, "--encoded", "--fail-on-flagged", odd, even)
    assert status == 3 and [r["flagged"] for r in records] == [False, True]
    assert run_check(capsys, "--encoded", odd, even)[0] == 0  # flagged, but not asked to fail on it
    missing = str(tmp_path / "missing.png")
    status, records, err = run_check(capsys, "--encoded", "--fail-on-flagged", even, missing)
    assert status == 1 and "error" in records[1] and "1 of 2 images were not checked" in err  # 1 wins over 3


def test_a_dash_reads_the_paths_from_stdin_one_a_line(fake_server, tmp_path, capsys, monkeypatch):
    _, serve = fake_server
    serve("ok")
    one, two, three = image_files(tmp_path, 1, 2, 3)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{two}\n\n   \n{three}\r\n"))
    status, records, _ = run_check(capsys, "--encoded", one, "-")
    assert status == 0 and [r["path"] for r in records] == [one, two, three]
    assert [r["flagged"] for r in records] == [False, True, False]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    status, records, err = run_check(capsys, "--encoded", "-")
    assert status == 2 and records == [] and "no FILE on stdin" in err


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--strictness", "0.5", "'strictness_adjustment' = 0.5 must be a number in [-0.1, 0.1]"),
        ("--strictness", "nan", "'strictness_adjustment' = nan must be a number"),
        ("--strictness", "paranoid", "unknown preset 'paranoid'"),
        ("--url", "grpc://host:1", "url 'grpc://host:1': only http:// or https://"),
    ],
)
def test_a_value_no_server_would_accept_is_a_usage_error_before_anything_is_sent(
    fake_server, tmp_path, capsys, option, value, words
):
    _, serve = fake_server
    state = serve("ok")
    with pytest.raises(SystemExit) as caught:
        cli.main(["check", option, value, *image_files(tmp_path, 1)])
    out, err = capsys.readouterr()
    assert caught.value.code == 2 and out == ""
    assert f"argument {option}: " in err and words in err
    assert "client" not in state  # no client was even built


# -- a text file is not an image file -----------------------------------------------------------------------------


def test_a_text_file_is_refused_by_name_as_not_an_image_and_base64_text_is_sent(tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image\n")
    with pytest.raises(ImageError) as caught:
        read_file(notes)
    assert str(caught.value) == (
        f"cannot check {str(notes)!r}: a text file, not an image file (PNG, JPEG, WEBP, GIF, BMP, TIFF)"
    )
    encoded = tmp_path / "picture.b64"
    encoded.write_bytes(
        b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==\n"
    )
    assert read_file(encoded) == encoded.read_bytes()  # base64 text of an image: the server decodes it
    png = tmp_path / "picture.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"text after a binary signature")
    assert read_file(png) == png.read_bytes()
