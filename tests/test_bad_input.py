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


def test_client_reports_an_unreachable_server():
    from safety_checker_admin.server import free_port

    with SafetyCheckerClient(f"127.0.0.1:{free_port()}", protocol="http", timeout_s=5) as client:
        with pytest.raises(CheckError):
            client.check_batch(valid(1))


def test_logs_hold_no_pixel_values(server):
    """Neither errors nor the server log repeat what was in an image."""
    pixels = np.full((2, 3, 224, 224), 1.2345678, dtype=np.float32)
    pixels[1, 0, 0, 0] = np.nan
    message = assert_refused(server, "http", pixels, "non-finite")
    raw_infer(server, "grpc", pixels[:1])
    log = server.log_path.read_text()
    assert log  # the server does write a log
    for text in (message, log):
        assert "1.234" not in text
