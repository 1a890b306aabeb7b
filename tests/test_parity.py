"""Decision-for-decision parity with diffusers, through a real tritonserver.

Every input's decision must equal what diffusers' forward() decides on the
same pixels, and every score must equal the reference's, over gRPC and HTTP,
in requests of 1, 3 and 32 images and under concurrent load (where the server
forms its own dynamic batches).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from crafting import CASCADE_MARGINS, PLAIN_MARGINS
from reference import diffusers_forward

from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient


@pytest.fixture(scope="module")
def expected(parity_set, reference_checker):
    flagged, concept, special = diffusers_forward(reference_checker, torch.from_numpy(parity_set.pixels))
    return flagged, concept, special


def client_for(server, protocol: str) -> SafetyCheckerClient:
    return SafetyCheckerClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol)


def assert_matches(results, expected, index):
    flagged, concept, special = expected
    got_flagged = np.array([r.flagged for r in results])
    np.testing.assert_array_equal(got_flagged, flagged[index])
    np.testing.assert_allclose(np.array([r.concept_scores for r in results]), concept[index], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array([r.special_scores for r in results]), special[index], rtol=0, atol=1e-6)


def test_the_set_exercises_every_case(parity_set, expected):
    """At least 200 inputs, both decisions, special-care alone, and every crafted margin."""
    flagged, concept, special = expected
    assert len(parity_set.pixels) >= 200
    assert 0.1 < flagged.mean() < 0.9
    special_only = (special > 0).any(axis=1) & ~flagged
    assert special_only.sum() >= 5, "special-care concepts alone must never flag"
    crafted = parity_set.crafted
    for margin in PLAIN_MARGINS + CASCADE_MARGINS:
        assert sum(c.margin == margin for c in crafted) >= 3, margin
    # The reference itself decides the crafted inputs by the rounding rule.
    for i, item in enumerate(crafted, start=parity_set.crafted_offset):
        score = round(item.margin + (0.01 if item.cascade else 0.0), 3)
        assert flagged[i] == (score > 0), (item.margin, item.achieved)
        assert concept[i, item.concept] == pytest.approx(score, abs=1e-9)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_parity(server, parity_set, expected, protocol, batch):
    pixels = parity_set.pixels
    indices = np.arange(len(pixels))
    with client_for(server, protocol) as client:
        results = []
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            answer = client.check_batch(pixels[chunk])
            assert len(answer) == len(chunk)
            results += answer
    assert_matches(results, expected, indices)


def test_image_embeds_match_pytorch(server, parity_set, reference_checker):
    from export.onnx_export import reference_outputs

    pixels = parity_set.pixels[:16]
    want = reference_outputs(reference_checker, torch.from_numpy(pixels))[spec.IMAGE_EMBEDS.name]
    with client_for(server, "grpc") as client:
        got = np.stack([r.image_embeds for r in client.check_batch(pixels)])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_concurrent_requests(server, parity_set, expected):
    """Many clients at once: the server forms mixed dynamic batches; every answer is still exact."""
    rng = np.random.default_rng(5)
    n = len(parity_set.pixels)
    jobs = [(("grpc", "http")[i % 2], rng.choice(n, size=int(rng.integers(1, 9)), replace=False)) for i in range(96)]

    def run(job):
        protocol, index = job
        with client_for(server, protocol) as client:
            return index, client.check_batch(parity_set.pixels[index])

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(run, jobs))
    assert len(answers) == len(jobs)
    for index, results in answers:
        assert_matches(results, expected, index)
    # Both steps saw batches formed from several requests, scored in one pass.
    for model in (spec.EMBEDDER_MODEL, spec.POSTPROCESS_MODEL):
        stats = _batch_stats(server, model)
        assert stats["executions"] < stats["requests"], f"dynamic batching never combined requests for {model}"


def _batch_stats(server, model: str):
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics(model)["model_stats"][0]
    client.close()
    return {"executions": int(stats["execution_count"]), "requests": int(stats["inference_stats"]["success"]["count"])}


def test_client_takes_what_a_pipeline_produces(server):
    """PIL images, uint8 arrays and SD pipeline float outputs of one picture get one answer."""
    from PIL import Image
    from skimage import data

    photo = data.coffee()  # uint8 HWC
    as_float = photo.astype(np.float32) / 255  # output_type="np": [0, 1], HWC
    as_latent_range = (as_float * 2 - 1).transpose(2, 0, 1)  # decoded latents: [-1, 1], CHW
    with client_for(server, "grpc") as client:
        want = client.check([Image.fromarray(photo)])[0]
        for images, value_range in (([photo], (0, 1)), ([as_float], (0, 1)), ([as_latent_range], (-1, 1))):
            got = client.check(images, value_range=value_range)[0]
            assert (got.flagged, got.concept_scores, got.special_scores) == (
                want.flagged,
                want.concept_scores,
                want.special_scores,
            )
