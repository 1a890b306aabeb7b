"""The uint8 input form: `safety_checker_uint8` answers exactly what the float32 path answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from reference import diffusers_forward

from fixtures.photos import photos
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.preprocess import normalize, preprocess, preprocess_uint8


def uint8_images() -> np.ndarray:
    """Real photos resized and cropped by the client, plus noise, gradients and flat blocks."""
    rng = np.random.default_rng(11)
    real = preprocess_uint8(list(photos().values()))
    noise = rng.integers(0, 256, size=(24, 224, 224, 3), dtype=np.uint8)
    low_contrast = rng.integers(90, 140, size=(8, 224, 224, 3), dtype=np.uint8)
    ramp = np.broadcast_to(np.arange(224, dtype=np.uint8)[None, :, None], (224, 224, 3))
    gradients = np.stack([np.roll(ramp, 17 * i, axis=1) for i in range(8)])
    blocks = np.kron(rng.integers(0, 256, size=(16, 7, 7, 3)), np.ones((1, 32, 32, 1))).astype(np.uint8)
    return np.concatenate([real, noise, low_contrast, gradients, blocks])


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return uint8_images()


def test_exported_normalizer_is_the_client_table_for_every_level(repository: Path):
    session = ort.InferenceSession(
        str(repository / spec.NORMALIZE_MODEL / "1" / spec.ONNX_FILENAME), providers=["CPUExecutionProvider"]
    )
    every_level = np.zeros((1, 224, 224, 3), dtype=np.uint8)
    every_level.reshape(-1)[:768] = np.repeat(np.arange(256, dtype=np.uint8), 3)
    every_level[0, 100:] = 255 - every_level[0, :124]
    (got,) = session.run(None, {spec.IMAGES.name: every_level})
    assert got.dtype == np.float32 and got.shape == (1, 3, 224, 224)
    assert np.array_equal(got, normalize(every_level))


def test_normalize_equals_clip_preprocessing():
    """The split preprocessing adds up to the whole: normalize(preprocess_uint8(x)) == preprocess(x)."""
    from skimage import data

    pictures = [data.astronaut(), data.coffee(), data.camera()]
    assert np.array_equal(normalize(preprocess_uint8(pictures)), preprocess(pictures))
    assert preprocess_uint8(pictures).nbytes == 3 * 224 * 224 * 3  # 150,528 bytes per image on the wire


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_same_answers_as_the_float_path_and_diffusers(server, reference_checker, images, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with (
        SafetyCheckerClient(url, protocol=protocol, uint8=True) as client_uint8,
        SafetyCheckerClient(url, protocol=protocol) as client_float,
    ):
        assert client_uint8.model_name == spec.UINT8_ENSEMBLE_MODEL
        got = client_uint8.check_batch(images)
        want = client_float.check_batch(normalize(images))
    flagged, concept, special = diffusers_forward(reference_checker, torch.from_numpy(normalize(images)))
    # Not vacuous: the calibrated tiny checker flags some of these and passes others.
    assert 0 < flagged.sum() < len(images)
    assert [r.flagged for r in got] == [r.flagged for r in want] == flagged.tolist()
    assert [r.concept_scores for r in got] == [r.concept_scores for r in want]
    assert [r.special_scores for r in got] == [r.special_scores for r in want]
    np.testing.assert_allclose([r.concept_scores for r in got], concept, atol=1e-6, rtol=0)
    np.testing.assert_allclose([r.special_scores for r in got], special, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        np.stack([r.image_embeds for r in got]), np.stack([r.image_embeds for r in want]), atol=1e-6, rtol=0
    )


def test_check_sends_uint8_images(server):
    from skimage import data

    pictures = [data.chelsea(), data.rocket()]
    with (
        SafetyCheckerClient(server.grpc_url, uint8=True) as client_uint8,
        SafetyCheckerClient(server.grpc_url) as client_float,
    ):
        assert client_uint8.preprocess(pictures).dtype == np.uint8
        got = [r.as_dict() for r in client_uint8.check(pictures)]
        assert got == [r.as_dict() for r in client_float.check(pictures)]


def test_wrong_input_form_is_refused_and_the_server_keeps_serving(server, images):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with SafetyCheckerClient(server.grpc_url, uint8=True) as client:
        with pytest.raises(ValueError, match="images must be uint8"):
            client.check_batch(images.astype(np.float32))
        with pytest.raises(ValueError, match=r"shape \[N, 224, 224, 3\]"):
            client.check_batch(np.ascontiguousarray(images[:2].transpose(0, 3, 1, 2)))
        raw = grpcclient.InferenceServerClient(server.grpc_url)
        wrong = grpcclient.InferInput(spec.IMAGES.name, [1, 224, 224, 3], "FP32")
        wrong.set_data_from_numpy(images[:1].astype(np.float32))
        with pytest.raises(InferenceServerException, match="(?i)data-type|datatype"):
            raw.infer(spec.UINT8_ENSEMBLE_MODEL, [wrong])
        raw.close()
        assert len(client.check_batch(images[:3])) == 3
