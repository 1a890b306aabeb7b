"""The client without a server: the one error type, the split of a refused batch, the retry loop on an injected
clock, the outputs it requests, the record schema and `check`'s lines (tritonclient faked: fake_tritonclient.py)."""

from __future__ import annotations

import io
import json
import socket
from typing import List

import numpy as np
import pytest
from fake_tritonclient import FakeClock, FakeTriton, UpperBound, answers, internal, numbers, refusal
from tritonclient.utils import InferenceServerException

from safety_checker_admin.server import free_port
from safety_checker_client import cli, spec
from safety_checker_client.client import ALL_OUTPUTS, ANSWER_FIELDS, RECORD_OUTPUTS, CheckResult, SafetyCheckerClient
from safety_checker_client.errors import CheckError
from safety_checker_client.preprocess import ImageError
from safety_checker_client.records import answered, record
from safety_checker_client.strictness import StrictnessError

WHERE = "safety_checker at host:1 (grpc)"


# -- the error type ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, message, kind, index",
    [
        ("StatusCode.INVALID_ARGUMENT", "image 3: corrupt or truncated image file", "refused", 3),
        ("400", "in ensemble 'safety_checker_images', image 12: not an image", "refused", 12),
        ("400", "request parameter 'strictness': unknown preset 'x'", "refused", None),
        ("StatusCode.INVALID_ARGUMENT", "pixel_values holds non-finite values (image 2: 1, image 5: 3)", "refused", 2),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'no_such_model' is not found", "refused", None),
        ("404", "unknown model", "refused", None),
        (None, "got unexpected datatype FP64 from numpy array", "refused", None),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", "unavailable", None),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", "unavailable", None),
        ("StatusCode.RESOURCE_EXHAUSTED", "image 1: queue full", "unavailable", None),
        ("StatusCode.ABORTED", "aborted", "unavailable", None),
        ("503", "Service Unavailable", "unavailable", None),
        ("502", "Bad Gateway", "unavailable", None),
        ("504", "Gateway Timeout", "unavailable", None),
        ("429", "Too Many Requests", "unavailable", None),
        ("StatusCode.INTERNAL", "image 0: the stub died", "internal", None),
        ("StatusCode.UNKNOWN", "unknown", "internal", None),
        ("500", "Internal Server Error", "internal", None),
    ],
)
def test_tritonclient_exceptions_are_classified_once(status, message, kind, index):
    error = CheckError.from_exception(InferenceServerException(message, status=status), WHERE)
    assert (error.kind, error.index, error.retryable) == (kind, index, kind != "refused")
    assert str(error) == f"{WHERE}: {message}"  # the server's words, without tritonclient's "[status]" prefix


def test_grpc_and_http_errors_as_tritonclient_builds_them():
    import grpc
    from tritonclient.grpc._utils import get_error_grpc
    from tritonclient.http._utils import _get_error

    class RpcError(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

        def debug_error_string(self):
            return ""

    class Response:
        def __init__(self, status_code: int, body: str) -> None:
            self.status_code, self.body = status_code, body

        def read(self) -> bytes:
            return self.body.encode()

    cases = [
        (get_error_grpc(RpcError(grpc.StatusCode.INVALID_ARGUMENT, "image 4: not an image")), "refused", 4),
        (get_error_grpc(RpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")), "unavailable", None),
        (get_error_grpc(RpcError(grpc.StatusCode.INTERNAL, "Stub process is not healthy")), "internal", None),
        (_get_error(Response(400, json.dumps({"error": "image 1: invalid base64"}))), "refused", 1),
        (_get_error(Response(503, json.dumps({"error": "restarting"}))), "unavailable", None),
        (_get_error(Response(500, "")), "internal", None),
    ]
    for exception, kind, index in cases:
        error = CheckError.from_exception(exception, WHERE)
        assert (error.kind, error.index) == (kind, index), exception


@pytest.mark.parametrize(
    "exception, text",
    [
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
        (socket.timeout("timed out"), "timed out"),
        (ConnectionResetError(), "ConnectionResetError"),
    ],
)
def test_socket_errors_are_unavailable(exception, text):
    error = CheckError.from_exception(exception, WHERE)
    assert error.kind == "unavailable" and error.retryable and error.index is None and text in str(error)


def test_a_strictness_the_server_would_refuse_is_a_refusal_and_a_check_error_stays_itself():
    error = CheckError.from_exception(StrictnessError("request parameter 'strictness_adjustment' = 0.5"), WHERE)
    assert (error.kind, error.index, error.retryable) == ("refused", None, False)
    assert CheckError.from_exception(error, "elsewhere") is error
    with pytest.raises(ValueError, match="kind"):
        CheckError("message", "lost")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_closed_port_is_unavailable_with_the_real_tritonclient(protocol):
    with SafetyCheckerClient(f"127.0.0.1:{free_port()}", protocol=protocol, deadline_s=0) as client:
        outcomes = client.check_each(np.zeros((2, 3, 224, 224), np.float32))
        assert client.attempts == 1
    assert all(isinstance(o, CheckError) and o.kind == "unavailable" and o.unreachable for o in outcomes)


# -- the split of a refused batch -------------------------------------------------------------------------------


def refusing(bad: set, names_seen: List[List[str]] = None):
    """A server that flags even numbers and refuses a batch holding a number in `bad`, naming the first."""

    def answer(batch, names, kwargs):
        values = numbers(batch)
        if names_seen is not None:
            names_seen.append(names)
        for index, value in enumerate(values):
            if value in bad:
                raise refusal(index, f"number {value} is invalid")
        return answers([v % 2 == 0 for v in values], names)

    return answer


def uint8_batch(values) -> np.ndarray:
    return np.stack([np.full((224, 224, 3), v, np.uint8) for v in values])


def client_for(triton: FakeTriton, **kwargs) -> SafetyCheckerClient:
    clock = FakeClock()
    kwargs.setdefault("uint8", True)
    return SafetyCheckerClient("host:1", triton=triton, monotonic=clock.monotonic, sleep=clock.sleep, **kwargs)


def test_a_refused_image_among_good_ones_takes_none_down():
    triton = FakeTriton(refusing({3, 5}))
    outcomes = client_for(triton).check_each(uint8_batch(range(8)))
    # Refused naming image 3, then (without it) image 4 (= number 5), then answered: three requests.
    assert [numbers(batch) for batch, _, _ in triton.requests] == [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 4, 5, 6, 7],
        [0, 1, 2, 4, 6, 7],
    ]
    for number, outcome in enumerate(outcomes):
        if number in (3, 5):
            assert isinstance(outcome, CheckError) and outcome.kind == "refused" and not outcome.retryable
            assert f"number {number} is invalid" in str(outcome)
        else:
            assert isinstance(outcome, CheckResult) and outcome.flagged == (number % 2 == 0)
    assert outcomes[3].index == 3 and outcomes[5].index == 4  # the index in the request that was refused


def test_batches_above_max_batch_size_are_split_and_each_refusal_stays_in_its_request():
    triton = FakeTriton(refusing({6}))
    outcomes = client_for(triton, max_batch_size=4).check_each(uint8_batch(range(10)))
    assert [numbers(batch) for batch, _, _ in triton.requests] == [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 7], [8, 9]]
    assert [isinstance(o, CheckResult) for o in outcomes] == [n != 6 for n in range(10)]


def test_a_refusal_naming_no_image_is_split_down_to_each_image_and_none_is_sent_twice():
    def answer(batch, names, kwargs):
        raise InferenceServerException("request parameter 'strictness': unknown preset", status="400")

    triton = FakeTriton(answer)
    outcomes = client_for(triton).check_each(uint8_batch(range(3)))
    # Halves down to one image (2n - 1 requests); a request that was refused is never sent again as it was.
    assert [numbers(batch) for batch, _, _ in triton.requests] == [[0, 1, 2], [0], [1, 2], [1], [2]]
    assert len({id(o) for o in outcomes}) == 3  # each image its own error
    assert all(o.kind == "refused" and o.index is None and "unknown preset" in str(o) for o in outcomes)


def poisoned(bad: set, status: str = "StatusCode.INTERNAL"):
    """A server that flags even numbers and fails, naming nothing, every request holding a number in `bad`."""

    def answer(batch, names, kwargs):
        values = numbers(batch)
        if bad & set(values):
            raise internal("the decoder failed", status)
        return answers([v % 2 == 0 for v in values], names)

    return answer


@pytest.mark.parametrize("status", ["StatusCode.INTERNAL", "StatusCode.UNKNOWN", "500"])
def test_an_internal_error_is_split_so_every_good_image_is_answered(status):
    """Finding 7: one file the server fails on among good ones took all of them down."""
    clock = FakeClock()
    triton = FakeTriton(poisoned({5}, status))
    outcomes = retrying_client(triton, clock, deadline_s=1, uint8=True).check_each(uint8_batch(range(8)))
    # A batch of several is split at once, not sent whole again; the file alone is retried as the policy says.
    assert [numbers(batch) for batch, _, _ in triton.requests] == [
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [4, 5],
        [4],
        [5],
        [5],
        [5],
        [6, 7],
    ]
    assert clock.sleeps == [0.25, 0.5]  # only the one-image request waited
    for number, outcome in enumerate(outcomes):
        if number == 5:
            assert isinstance(outcome, CheckError) and outcome.kind == "internal" and outcome.retryable
            assert "the decoder failed" in str(outcome) and "(not checked: 3 attempts" in str(outcome)
        else:
            assert isinstance(outcome, CheckResult) and outcome.flagged == (number % 2 == 0)


def test_several_failing_images_each_get_their_error_and_every_other_its_answer():
    triton = FakeTriton(poisoned({0, 9, 10, 31}))
    outcomes = client_for(triton, deadline_s=0).check_each(uint8_batch(range(32)))
    assert [n for n, o in enumerate(outcomes) if isinstance(o, CheckError)] == [0, 9, 10, 31]
    assert all(o.flagged == (n % 2 == 0) for n, o in enumerate(outcomes) if isinstance(o, CheckResult))
    sent = [numbers(batch) for batch, _, _ in triton.requests]
    answered_in = [batch for batch in sent if not {0, 9, 10, 31} & set(batch)]
    assert sorted(n for batch in answered_in for n in batch) == sorted(set(range(32)) - {0, 9, 10, 31})
    assert [batch for batch in sent if len(batch) == 1 and batch not in answered_in] == [[0], [9], [10], [31]]
    assert len(sent) == 27  # a split per level of each failing image's halves: fewer than one request per image


def over_the_view_limit(most: int, bad: set = frozenset()):
    """A server that refuses, naming no image, a request of more than `most` images (as the decoder refuses one
    whose files make more than max_views views), and refuses one holding a number in `bad`, naming it."""

    def answer(batch, names, kwargs):
        if len(batch) > most:
            raise InferenceServerException(
                "in ensemble 'safety_checker_images', the files of this request make more than 32 views to check "
                "(max_views); nothing in this request was checked",
                status="StatusCode.INVALID_ARGUMENT",
            )
        return refusing(set(bad))(batch, names, kwargs)

    return answer


def test_a_request_refused_as_a_whole_is_sent_again_in_halves_until_each_fits(tmp_path):
    triton = FakeTriton(over_the_view_limit(2))
    outcomes = client_for(triton).check_each(uint8_batch(range(7)))
    assert [numbers(batch) for batch, _, _ in triton.requests] == [
        [0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2],
        [0],
        [1, 2],
        [3, 4, 5, 6],
        [3, 4],
        [5, 6],
    ]
    assert [o.flagged for o in outcomes] == [n % 2 == 0 for n in range(7)]
    # check_encoded and check_files split the same way; a file refused in a half is named by its own path.
    paths = []
    for number in range(7):
        paths.append(tmp_path / f"{number}.png")
        paths[-1].write_bytes(str(number).encode())
    encoded = client_for(FakeTriton(over_the_view_limit(2)), uint8=False, encoded=True)
    assert [r.flagged for r in encoded.check_encoded([p.read_bytes() for p in paths])] == [n % 2 == 0 for n in range(7)]
    refusing_five = client_for(FakeTriton(over_the_view_limit(2, {5})), uint8=False, encoded=True)
    with pytest.raises(CheckError, match=r"5\.png: .*image 0: number 5 is invalid"):
        refusing_five.check_files(paths)


def test_an_unavailable_server_is_not_split_and_ends_the_call():
    clock = FakeClock()
    triton = FakeTriton(failing(times=1000))
    client = retrying_client(triton, clock, deadline_s=4, uint8=True, max_batch_size=4)
    outcomes = client.check_each(uint8_batch(range(10)))
    assert len(triton.requests) == 5 and clock.sleeps == [0.25, 0.5, 1.0, 2.0]  # one request's retries, no more
    assert len({id(o) for o in outcomes}) == 1 and outcomes[0].kind == "unavailable" and outcomes[0].retryable
    # A server that fails while answering, then goes away: the split stops at the first unavailable answer.
    calls = []

    def answer(batch, names, kwargs):
        calls.append(numbers(batch))
        if len(calls) == 1:
            raise internal()
        raise InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")

    outcomes = client_for(FakeTriton(answer), deadline_s=0).check_each(uint8_batch(range(8)))
    assert calls == [list(range(8)), [0, 1, 2, 3]]
    assert all(o.kind == "unavailable" for o in outcomes)


def test_check_batch_raises_the_refusal_without_sending_again_and_check_files_names_the_file(tmp_path):
    triton = FakeTriton(refusing({2}))
    client = client_for(triton)
    with pytest.raises(CheckError) as caught:
        client.check_batch(uint8_batch(range(4)))
    assert caught.value.index == 2 and len(triton.requests) == 1
    paths = []
    for number in range(4):
        paths.append(tmp_path / f"{number}.png")
        paths[-1].write_bytes(str(number).encode())
    encoded = client_for(FakeTriton(refusing({2})), uint8=False, encoded=True)
    with pytest.raises(CheckError, match=r"2\.png: .*image 2: number 2 is invalid"):
        encoded.check_files(paths)
    assert [r.flagged for r in encoded.check_files(paths[:2])] == [True, False]


def test_a_strictness_the_rule_refuses_is_refused_before_anything_is_sent():
    triton = FakeTriton(refusing(set()))
    client = client_for(triton)
    outcomes = client.check_each(uint8_batch(range(2)), strictness=0.5)
    assert all(o.kind == "refused" and "'strictness_adjustment'" in str(o) for o in outcomes)
    with pytest.raises(CheckError, match="unknown preset"):
        client.check_batch(uint8_batch(range(2)), strictness="paranoid")
    assert triton.requests == []
    client.check_batch(uint8_batch(range(2)), strictness="strong")
    assert triton.requests[0][2]["parameters"] == {spec.STRICTNESS_PARAMETER: "strong"}


# -- the retry loop ---------------------------------------------------------------------------------------------


def failing(times: int, status: str = "StatusCode.UNAVAILABLE"):
    """A server that fails the first `times` requests with `status`, then answers."""
    calls = []

    def answer(batch, names, kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise InferenceServerException("the server is restarting", status=status)
        return answers([False] * len(batch), names)

    return answer


def retrying_client(triton: FakeTriton, clock: FakeClock, deadline_s: float, **kwargs) -> SafetyCheckerClient:
    return SafetyCheckerClient(
        "host:1",
        deadline_s=deadline_s,
        triton=triton,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=kwargs.pop("rng", UpperBound()),
        **kwargs,
    )


@pytest.mark.parametrize(
    "deadline_s, waits",
    [
        (0, []),
        (4, [0.25, 0.5, 1.0, 2.0]),  # the next wait (4 s) would end at 7.75 s, past the deadline
        (30, [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]),  # waits double up to 5 s
    ],
)
def test_a_failing_server_is_retried_until_the_deadline_on_the_injected_clock(deadline_s, waits):
    clock = FakeClock()
    triton = FakeTriton(failing(times=1000))
    client = retrying_client(triton, clock, deadline_s)
    with pytest.raises(CheckError) as caught:
        client.check_batch(np.zeros((1, 3, 224, 224), np.float32))
    assert clock.sleeps == waits
    assert client.attempts == len(triton.requests) == len(waits) + 1
    assert triton.connections == len(waits) + 1  # each retry on a fresh connection
    assert caught.value.kind == "unavailable"
    if waits:
        assert f"(not checked: {len(waits) + 1} attempts in {sum(waits):.1f} s)" in str(caught.value)


def test_waits_are_drawn_between_half_and_all_of_the_schedule():
    class LowerBound:
        def uniform(self, low, high):
            return low

    clock = FakeClock()
    client = retrying_client(FakeTriton(failing(times=1000)), clock, deadline_s=4, rng=LowerBound())
    with pytest.raises(CheckError):
        client.check_batch(np.zeros((1, 3, 224, 224), np.float32))
    assert clock.sleeps == [0.125, 0.25, 0.5, 1.0, 2.0] and client.attempts == 6


def test_a_server_that_recovers_answers_and_a_refusal_or_internal_error_is_handled_as_its_kind():
    clock = FakeClock()
    client = retrying_client(FakeTriton(failing(times=2)), clock, deadline_s=60)
    assert len(client.check_batch(np.zeros((3, 3, 224, 224), np.float32))) == 3
    assert clock.sleeps == [0.25, 0.5] and client.attempts == 3
    clock = FakeClock()
    client = retrying_client(FakeTriton(failing(times=1, status="StatusCode.INTERNAL")), clock, deadline_s=60)
    client.check_batch(np.zeros((1, 3, 224, 224), np.float32))
    assert client.attempts == 2  # the server failed while answering: sent again
    clock = FakeClock()
    client = retrying_client(FakeTriton(failing(times=1, status="StatusCode.INVALID_ARGUMENT")), clock, deadline_s=60)
    with pytest.raises(CheckError):
        client.check_batch(np.zeros((1, 3, 224, 224), np.float32))
    assert client.attempts == 1 and clock.sleeps == []  # refused: never sent again


# -- what is requested, what a result holds ---------------------------------------------------------------------


def test_only_the_requested_outputs_are_asked_for_and_the_rest_is_none():
    seen: List[List[str]] = []
    client = client_for(FakeTriton(refusing(set(), seen)), outputs=RECORD_OUTPUTS)
    (result,) = client.check_each(uint8_batch([2]))
    pixel_only = lambda names: [n for n in names if n != spec.VIEW.name]  # `view` is an image file's
    assert seen[-1] == pixel_only(RECORD_OUTPUTS) and spec.IMAGE_EMBEDS.name not in seen[-1]
    assert result.image_embeds is None and result.custom_cosines is None and result.view is None
    assert list(result.as_dict()) == pixel_only(ANSWER_FIELDS)
    (full,) = client_for(FakeTriton(refusing(set(), seen))).check_each(uint8_batch([2]))
    assert seen[-1] == pixel_only(ALL_OUTPUTS) and full.image_embeds.shape == (4,) and full.custom_cosines == {}
    files = client_for(FakeTriton(refusing(set(), seen)), uint8=False, encoded=True, outputs=RECORD_OUTPUTS)
    (file_result,) = files.check_encoded([b"2"])
    assert seen[-1] == list(RECORD_OUTPUTS) and list(file_result.as_dict()) == list(ANSWER_FIELDS)
    assert file_result.view == {"frame": 0, "frames": 1, "transparency": None, "views": 1}
    lean = client_for(FakeTriton(refusing(set(), seen)), outputs=[spec.CONCEPT_SCORES.name])
    (scores,) = lean.check_each(uint8_batch([3]))
    assert seen[-1] == [spec.HAS_NSFW_CONCEPTS.name, spec.CONCEPT_SCORES.name]  # the decision always comes
    assert scores.as_dict() == {"flagged": False, "concept_scores": [-0.01] * 17}
    assert scores.special_scores is None and scores.exact_scores is None
    with pytest.raises(ValueError, match="unknown outputs"):
        client_for(FakeTriton(refusing(set())), outputs=["scores"])


def test_the_batch_size_is_the_contracts_without_asking_the_server():
    triton = FakeTriton(refusing(set()))
    client = client_for(triton)
    assert client.max_batch_size == spec.MAX_BATCH_SIZE
    assert len(client.check_batch(uint8_batch([0] * (spec.MAX_BATCH_SIZE + 1)))) == spec.MAX_BATCH_SIZE + 1
    assert [len(batch) for batch, _, _ in triton.requests] == [spec.MAX_BATCH_SIZE, 1]  # infer only, no config


# -- one record schema, and check's lines ---------------------------------------------------------------------


def test_a_record_has_every_answer_field_or_an_error_and_never_flagged():
    result = CheckResult(True, [0.01] * 17, [-0.1] * 3, custom_scores={}, fired_concepts=["concept_00"])
    result.concept_set_version, result.strictness_adjustment, result.exact_scores = 0, 0.0, True
    result.view = {"frame": 1, "frames": 2, "transparency": "dropped", "views": 4}
    good = record("a.png", result, size=3, sha256="ab")
    assert list(good) == ["path", "size", "sha256", *ANSWER_FIELDS, "error"] and answered(good)
    refused = record("b.png", error=CheckError("safety_checker_images at h:1 (grpc): image 2: bad", "refused", 2))
    assert refused == {"path": "b.png", "error": "b.png: safety_checker_images at h:1 (grpc): image 2: bad"}
    down = record("c.png", error=CheckError("safety_checker at h:1 (grpc): refused", "unavailable"))
    assert down["error"] == "safety_checker at h:1 (grpc): refused" and not answered(down)
    assert record("d.png", error=ImageError("cannot read 'd.png'"))["error"] == "cannot read 'd.png'"
    assert record("e.png") == {"path": "e.png", "error": "not checked"}


def test_check_prints_one_line_per_file_in_order_and_a_refused_file_takes_no_other_down(tmp_path):
    paths = []
    for name in ("0", "1", "bad", "3"):
        paths.append(str(tmp_path / f"{name}.png"))
        if name != "bad":
            (tmp_path / f"{name}.png").write_bytes(name.encode())
    paths.insert(2, str(tmp_path / "7.png"))
    (tmp_path / "7.png").write_bytes(b"7")
    triton = FakeTriton(refusing({7}))
    out = io.StringIO()
    client = client_for(triton, uint8=False, encoded=True, outputs=RECORD_OUTPUTS)
    assert cli.check_files(paths, client, out) == (2, 1)  # not answered, flagged
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["path"] for line in lines] == paths
    assert [line.get("flagged") for line in lines] == [True, False, None, None, False]
    refused, unreadable = lines[2], lines[3]
    assert refused["error"].startswith(f"{paths[2]}: ") and "image 2: number 7 is invalid" in refused["error"]
    assert paths[3] in unreadable["error"] and "flagged" not in unreadable
    assert len(triton.requests) == 2  # the refused request, then the others without the refused file
