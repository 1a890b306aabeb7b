"""Bad requests get a clear error naming what was wrong, and the server keeps serving.

A NaN or Inf must never come back as "safe": such requests are refused with
INVALID_ARG. Raw tritonclient requests are used here, as any user could send.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from safety_checker_client import spec
from safety_checker_client.client import CheckError, SafetyCheckerClient

MODULES = {"grpc": grpcclient, "http": httpclient}


def raw_infer(server, protocol: str, array: np.ndarray, datatype: str = "FP32", model: str = spec.ENSEMBLE_MODEL):
    module = MODULES[protocol]
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    try:
        tensor = module.InferInput(spec.PIXEL_VALUES.name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return client.infer(model, [tensor])
    finally:
        client.close()


def assert_refused(server, protocol, array, *fragments, datatype="FP32", model=spec.ENSEMBLE_MODEL, status=None):
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(server, protocol, array, datatype, model)
    message = caught.value.message()
    for fragment in fragments:
        assert fragment in message, message
    if status is not None:
        assert status[protocol] in str(caught.value.status()), caught.value.status()
    assert_still_serving(server, protocol)
    return message


def assert_still_serving(server, protocol):
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    result = raw_infer(server, protocol, pixels)
    assert result.as_numpy(spec.HAS_NSFW_CONCEPTS.name).shape == (2, 1)


INVALID_ARG = {"grpc": "INVALID_ARGUMENT", "http": "400"}
PROTOCOLS = pytest.mark.parametrize("protocol", ["grpc", "http"])


def valid(n: int = 3) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 224, 224)).astype(np.float32)


@PROTOCOLS
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_refused(server, protocol, value):
    pixels = valid(4)
    pixels[2, 1, 100, 100] = value
    message = assert_refused(server, protocol, pixels, "non-finite", "pixel_values", "image 2", status=INVALID_ARG)
    assert "nothing in this request was checked" in message


@PROTOCOLS
def test_all_nan_image_is_refused(server, protocol):
    pixels = valid(1)
    pixels[:] = np.nan
    assert_refused(server, protocol, pixels, "non-finite", status=INVALID_ARG)


@PROTOCOLS
def test_wrong_shape(server, protocol):
    assert_refused(server, protocol, np.zeros((1, 3, 224, 225), np.float32), "pixel_values", "shape")
    assert_refused(server, protocol, np.zeros((1, 224, 224, 3), np.float32), "pixel_values", "shape")


@PROTOCOLS
def test_wrong_dtype(server, protocol):
    assert_refused(server, protocol, np.zeros((1, 3, 224, 224), np.float64), "pixel_values", "FP64", datatype="FP64")
    assert_refused(server, protocol, np.zeros((1, 3, 224, 224), np.uint8), "pixel_values", "UINT8", datatype="UINT8")


@PROTOCOLS
def test_empty_batch(server, protocol):
    assert_refused(server, protocol, np.zeros((0, 3, 224, 224), np.float32), "pixel_values")


@PROTOCOLS
def test_batch_above_max_batch_size(server, protocol):
    too_many = np.zeros((spec.MAX_BATCH_SIZE + 1, 3, 224, 224), np.float32)
    assert_refused(server, protocol, too_many, f"batch-size must be <= {spec.MAX_BATCH_SIZE}")


@PROTOCOLS
def test_unknown_model(server, protocol):
    assert_refused(server, protocol, valid(1), "no_such_model", model="no_such_model")


@PROTOCOLS
def test_client_splits_large_batches_and_refuses_empty_ones(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with SafetyCheckerClient(url, protocol=protocol) as client:
        assert client.max_batch_size == spec.MAX_BATCH_SIZE
        pixels = valid(spec.MAX_BATCH_SIZE + 5)
        many = client.check_batch(pixels)
        assert len(many) == len(pixels)
        alone = client.check_batch(pixels[-5:])
        assert [r.concept_scores for r in many[-5:]] == [r.concept_scores for r in alone]
        with pytest.raises(ValueError, match="no images"):
            client.check_batch(pixels[:0])
        pixels[-1, 0, 0, 0] = np.nan  # in the second request: the whole call fails, nothing is reported
        with pytest.raises(CheckError, match="non-finite"):
            client.check_batch(pixels)
        # Image by image: the refused one gets the refusal, every other one its answer (the same as before).
        outcomes = client.check_each(pixels)
        assert [isinstance(o, CheckError) for o in outcomes] == [False] * (len(pixels) - 1) + [True]
        assert outcomes[-1].kind == "refused" and outcomes[-1].index == 4 and "non-finite" in str(outcomes[-1])
        assert [r.concept_scores for r in outcomes[:-1]] == [r.concept_scores for r in many[:-1]]


def test_client_reports_an_unreachable_server():
    from safety_checker_admin.server import free_port

    with SafetyCheckerClient(f"127.0.0.1:{free_port()}", protocol="http", deadline_s=0) as client:
        with pytest.raises(CheckError) as caught:
            client.check_batch(valid(1))
    # Unavailable, so worth sending again (until a deadline: test_client_units.py counts those retries).
    assert caught.value.kind == "unavailable" and caught.value.retryable and client.attempts == 1


def test_logs_hold_no_pixel_values(server):
    """Neither errors nor the server log repeat what was in an image."""
    # Negative, so that its digits cannot come from a log line's timestamp (HH:MM:SS.micro).
    pixels = np.full((2, 3, 224, 224), -1.2345678, dtype=np.float32)
    pixels[1, 0, 0, 0] = np.nan
    message = assert_refused(server, "http", pixels, "non-finite")
    raw_infer(server, "grpc", pixels[:1])
    log = server.log_path.read_text()
    assert log  # the server does write a log
    for text in (message, log):
        assert "-1.234" not in text


# -- the bad-request suite: every kind over both protocols, each followed by a good request ----------------------
# Sent below tritonclient (raw_requests.py), which refuses some of them itself. After each refusal, a good request
# must be answered exactly as before the bad one: the same bytes in every output.

from raw_requests import STATUS, Request, Tensor, send, tensor  # noqa: E402

GOOD = valid(3)
ACCEPTED = "accepted: strictness, strictness_adjustment"


def answer(server, protocol: str) -> dict:
    module = MODULES[protocol]
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    try:
        tensor_ = module.InferInput(spec.PIXEL_VALUES.name, list(GOOD.shape), "FP32")
        tensor_.set_data_from_numpy(GOOD)
        outputs = [module.InferRequestedOutput(t.name) for t in spec.ENSEMBLE_OUTPUTS]
        result = client.infer(spec.ENSEMBLE_MODEL, [tensor_], outputs=outputs)
    finally:
        client.close()
    return {t.name: result.as_numpy(t.name) for t in spec.ENSEMBLE_OUTPUTS}


@pytest.fixture(scope="module")
def baseline(server):
    return {protocol: answer(server, protocol) for protocol in MODULES}


def assert_answered_as_before(server, protocol, baseline):
    now = answer(server, protocol)
    for name, expected in baseline[protocol].items():
        assert now[name].dtype == expected.dtype and np.array_equal(now[name], expected), name


def _pixels(n: int = 1) -> np.ndarray:
    return valid(n)


def _ensemble(parameters=None, pixels=None, **fields) -> Request:
    pixels = _pixels(2) if pixels is None else pixels
    return Request(spec.ENSEMBLE_MODEL, [tensor(spec.PIXEL_VALUES.name, pixels)], dict(parameters or {}), **fields)


def _with_value(value: float) -> Request:
    pixels = _pixels(4)
    pixels[2, 1, 100, 100] = value
    return _ensemble(pixels=pixels)


def _postprocess(nonfinite: int = 0, parameters=None, dim: int = 16) -> Request:
    inputs = [
        tensor("concept_cosines", np.zeros((1, 17), np.float32)),
        tensor("special_cosines", np.zeros((1, 3), np.float32)),
        Tensor("nonfinite_values", "INT64", [1, 1], np.full((1, 1), nonfinite, np.int64).tobytes()),
        tensor("image_embeds", np.ones((1, dim), np.float32)),
    ]
    return Request(spec.POSTPROCESS_MODEL, inputs, dict(parameters or {}))


def _pixels_as(datatype: str, array: np.ndarray) -> Request:
    return Request(spec.ENSEMBLE_MODEL, [Tensor(spec.PIXEL_VALUES.name, datatype, list(array.shape), array.tobytes())])


def _declared(shape, data: bytes, model=spec.ENSEMBLE_MODEL, name=spec.PIXEL_VALUES.name, datatype="FP32") -> Request:
    return Request(model, [Tensor(name, datatype, list(shape), data)])


ONE_IMAGE = _pixels(1).tobytes()
UNKNOWN = ("unknown request parameter", ACCEPTED)

# (id, request, expected status, fragments of the message)
BAD_REQUESTS = [
    # Request parameters: a name the checker does not know is never ignored (finding 1).
    ("mistyped-strictnes", _ensemble({"strictnes": "max"}), "invalid", ("'strictnes'", *UNKNOWN)),
    ("capitalised-Strictness", _ensemble({"Strictness": "max"}), "invalid", ("'Strictness'", *UNKNOWN)),
    ("abbreviated-strictness_adj", _ensemble({"strictness_adj": 0.05}), "invalid", ("'strictness_adj'", *UNKNOWN)),
    ("upper-case-STRICTNESS", _ensemble({"STRICTNESS": "max"}), "invalid", ("'STRICTNESS'", *UNKNOWN)),
    ("leading-space", _ensemble({" strictness": "max"}), "invalid", ("' strictness'", *UNKNOWN)),
    ("look-alike-unicode", _ensemble({"stríctness": "max"}), "invalid", ("'stríctness'", *UNKNOWN)),
    ("empty-name", _ensemble({"": 1}), "invalid", ("''", *UNKNOWN)),
    ("unknown-int", _ensemble({"threshold": 1}), "invalid", ("'threshold'", *UNKNOWN)),
    ("unknown-bool", _ensemble({"strict": True}), "invalid", ("'strict'", *UNKNOWN)),
    ("unknown-float", _ensemble({"adjustment": 0.02}), "invalid", ("'adjustment'", *UNKNOWN)),
    ("two-unknown", _ensemble({"foo": 1, "bar": "x"}), "invalid", ("'foo'", "'bar'", *UNKNOWN)),
    ("known-and-unknown", _ensemble({"strictness": "max", "extra": 1}), "invalid", ("'extra'", *UNKNOWN)),
    ("tritonclient-headers-name", _ensemble({"headers": "x"}), "invalid", ("'headers'", *UNKNOWN)),
    ("triton-prefix", _ensemble({"triton_foo": 1}), "invalid", ("reserved for Triton",)),
    ("long-value", _ensemble({"strictness": "x" * 2000}), "invalid", ("more than the 1024 allowed",)),
    ("long-name", _ensemble({"s" * 2000: 1}), "invalid", ("more than the 1024 allowed",)),
    ("unknown-preset", _ensemble({"strictness": "paranoid"}), "invalid", ("unknown preset 'paranoid'",)),
    ("empty-preset", _ensemble({"strictness": ""}), "invalid", ("unknown preset ''",)),
    ("number-as-preset", _ensemble({"strictness": 3}), "invalid", ("unknown preset 3",)),
    ("adjustment-too-large", _ensemble({"strictness_adjustment": 0.5}), "invalid", ("[-0.1, 0.1]",)),
    ("adjustment-nan", _ensemble({"strictness_adjustment": "nan"}), "invalid", ("must be a number",)),
    ("adjustment-bool", _ensemble({"strictness_adjustment": True}), "invalid", ("must be a number",)),
    ("adjustment-text", _ensemble({"strictness_adjustment": "a lot"}), "invalid", ("must be a number",)),
    (
        "preset-and-adjustment",
        _ensemble({"strictness": "weak", "strictness_adjustment": 0.01}),
        "invalid",
        ("both given",),
    ),
    # Tensors.
    ("width-225", _ensemble(pixels=np.zeros((1, 3, 224, 225), np.float32)), "invalid", ("unexpected shape",)),
    ("channels-last", _ensemble(pixels=np.zeros((1, 224, 224, 3), np.float32)), "invalid", ("unexpected shape",)),
    ("rank-3", _ensemble(pixels=np.zeros((3, 224, 224), np.float32)), "invalid", ("unexpected shape",)),
    ("huge-declared-shape", _declared([1, 3, 224, 224000], ONE_IMAGE), "invalid", ("unexpected shape",)),
    ("fp64", _pixels_as("FP64", _pixels(1).astype(np.float64)), "invalid", ("'FP64'",)),
    ("uint8", _pixels_as("UINT8", np.zeros((1, 3, 224, 224), np.uint8)), "invalid", ("'UINT8'",)),
    ("int32", _pixels_as("INT32", np.zeros((1, 3, 224, 224), np.int32)), "invalid", ("'INT32'",)),
    ("bytes", _declared([1, 3, 224, 224], ONE_IMAGE, datatype="BYTES"), "invalid", ("'BYTES'",)),
    ("empty-batch", _ensemble(pixels=np.zeros((0, 3, 224, 224), np.float32)), "invalid", ("pixel_values",)),
    (
        "batch-of-33",
        _ensemble(pixels=np.zeros((spec.MAX_BATCH_SIZE + 1, 3, 224, 224), np.float32)),
        "invalid",
        (f"batch-size must be <= {spec.MAX_BATCH_SIZE}",),
    ),
    ("data-too-short", _declared([1, 3, 224, 224], b"\0" * 100), "invalid", ("byte size mismatch",)),
    ("data-too-long", _declared([1, 3, 224, 224], ONE_IMAGE * 2), "invalid", ("byte size mismatch",)),
    ("nan-pixel", _with_value(np.nan), "invalid", ("non-finite", "image 2", "nothing in this request was checked")),
    ("inf-pixel", _with_value(np.inf), "invalid", ("non-finite", "image 2")),
    ("minus-inf-pixel", _with_value(-np.inf), "invalid", ("non-finite", "image 2")),
    ("unknown-model", Request("no_such_model", [tensor("pixel_values", _pixels(1))]), "not_found", ("no_such_model",)),
    ("unknown-version", _ensemble(version="7"), "not_found", ("version 7",)),
    ("unknown-input", Request(spec.ENSEMBLE_MODEL, [tensor("pixels", _pixels(1))]), "invalid", ("'pixels'",)),
    (
        "extra-input",
        Request(spec.ENSEMBLE_MODEL, [tensor("pixel_values", _pixels(1)), tensor("extra", _pixels(1))]),
        "invalid",
        ("expected 1 inputs but got 2",),
    ),
    ("no-input", Request(spec.ENSEMBLE_MODEL, []), "invalid", ("expected 1 inputs but got 0",)),
    ("unknown-output", _ensemble(outputs=["no_such_output"]), "invalid", ("'no_such_output'",)),
    (
        "uint8-ensemble-given-fp32",
        Request(spec.UINT8_ENSEMBLE_MODEL, [tensor("images", np.zeros((1, 224, 224, 3), np.float32))]),
        "invalid",
        ("'FP32'",),
    ),
    (
        "uint8-ensemble-channels-first",
        Request(spec.UINT8_ENSEMBLE_MODEL, [tensor("images", np.zeros((1, 3, 224, 224), np.uint8))]),
        "invalid",
        ("unexpected shape",),
    ),
    (
        "uint8-ensemble-mistyped-parameter",
        Request(
            spec.UINT8_ENSEMBLE_MODEL, [tensor("images", np.zeros((1, 224, 224, 3), np.uint8))], {"strictnes": "max"}
        ),
        "invalid",
        ("'strictnes'", *UNKNOWN),
    ),
    # Every served model, called directly.
    ("postprocess-non-finite-count", _postprocess(nonfinite=1), "invalid", ("non-finite",)),
    ("postprocess-unknown-parameter", _postprocess(parameters={"strictnes": "max"}), "invalid", UNKNOWN),
    (
        "embedder-unknown-parameter",
        Request(spec.EMBEDDER_MODEL, [tensor("pixel_values", _pixels(1))], {"strictnes": "max"}),
        "invalid",
        UNKNOWN,
    ),
    (
        "normalizer-unknown-parameter",
        Request(spec.NORMALIZE_MODEL, [tensor("images", np.zeros((1, 224, 224, 3), np.uint8))], {"strictnes": "max"}),
        "invalid",
        UNKNOWN,
    ),
]


@PROTOCOLS
@pytest.mark.parametrize("kind, request_, status, fragments", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_and_the_next_good_one_answered_as_before(
    server, baseline, protocol, kind, request_, status, fragments
):
    got, message = send(server, protocol, request_)
    assert got == STATUS[status][protocol], (got, message)
    for fragment in fragments:
        assert fragment in message, message
    assert len(message) < 2000  # an error never repeats all that a client sent
    assert_answered_as_before(server, protocol, baseline)


def test_the_suite_has_forty_kinds_or_more():
    assert len({kind for kind, *_ in BAD_REQUESTS}) >= 40


def test_a_parameter_given_twice_is_refused(server, baseline):
    """The HTTP/JSON protocol can spell a key twice; which one would count is not for the server to guess."""
    from raw_requests import send_http_body

    pixels = _pixels(1)
    for values in (("max", "weak"), ("max", "max")):
        first, second = values
        header = (
            f'{{"parameters": {{"strictness": "{first}", "strictness": "{second}"}}, "inputs": [{{"name": '
            f'"pixel_values", "datatype": "FP32", "shape": [1, 3, 224, 224], "parameters": {{"binary_data_size": '
            f"{pixels.nbytes}}}}}]}}"
        ).encode()
        status, message = send_http_body(
            server.http_url,
            f"/v2/models/{spec.ENSEMBLE_MODEL}/infer",
            header + pixels.tobytes(),
            {"Inference-Header-Content-Length": str(len(header))},
        )
        assert status == 400 and "'strictness' is given more than once" in message, (status, message)
        assert_answered_as_before(server, "http", baseline)


# Triton's reserved request parameters: its front ends consume them (binary_data_output reaches a model over gRPC),
# so the checker accepts them and answers exactly as without them.
RESERVED = {
    "grpc": [
        {"sequence_id": 7},
        {"sequence_id": "a-string-id"},
        {"sequence_id": 8, "sequence_start": True, "sequence_end": True},
        {"priority": 1},
        {"priority": 2},
        {"timeout": 60_000_000},
        {"binary_data_output": True},
        {"triton_enable_empty_final_response": True},
        {"strictness": "normal", "priority": 1, "timeout": 60_000_000},
    ],
    "http": [
        {"sequence_id": 7},
        {"sequence_id": "a-string-id"},
        {"sequence_id": 8, "sequence_start": True, "sequence_end": True},
        {"priority": 1},
        {"priority": 2},
        {"timeout": 60_000_000},
        {"binary_data_output": True},
        {"binary_data_output": False},
        {"strictness": "normal", "priority": 1, "timeout": 60_000_000},
    ],
}


def _outputs(protocol: str, answer_) -> dict:
    """The answer of a raw request as numpy arrays by name (JSON or binary outputs, gRPC raw contents)."""
    from raw_requests import bytes_elements

    types = {"BOOL": np.bool_, "FP32": np.float32, "FP64": np.float64, "INT64": np.int64}
    found = {}
    if protocol == "grpc":
        for output, raw in zip(answer_.outputs, answer_.raw_output_contents):
            if output.datatype == "BYTES":
                value = np.array(bytes_elements(raw), dtype=object)
            else:
                value = np.frombuffer(raw, dtype=types[output.datatype])
            found[output.name] = value.reshape(list(output.shape))
        return found
    header, tail = answer_
    offset = 0
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            raw, offset = tail[offset : offset + size], offset + size
            if output["datatype"] == "BYTES":
                value = np.array(bytes_elements(raw), dtype=object)
            else:
                value = np.frombuffer(raw, dtype=types[output["datatype"]])
        elif output["datatype"] == "BYTES":
            value = np.array([item.encode() for item in output["data"]], dtype=object)
        else:
            value = np.array(output["data"], dtype=types[output["datatype"]])
        found[output["name"]] = value.reshape(output["shape"])
    return found


@pytest.mark.parametrize(
    "protocol, parameters",
    [(p, params) for p in ("grpc", "http") for params in RESERVED[p]],
    ids=[f"{p}-{'-'.join(params)}" for p in ("grpc", "http") for params in RESERVED[p]],
)
def test_tritons_reserved_parameters_pass(server, baseline, protocol, parameters):
    names = [t.name for t in spec.ENSEMBLE_OUTPUTS]
    status, answer_ = send(server, protocol, _ensemble(parameters, pixels=GOOD, outputs=names))
    assert status is None, answer_
    got = _outputs(protocol, answer_)
    for name, expected in baseline[protocol].items():
        assert np.array_equal(got[name].astype(expected.dtype), expected), name
