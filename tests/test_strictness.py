"""Strictness through a real tritonserver: presets, the per-request override, and its bounds.

"normal" must reproduce diffusers exactly. Every other adjustment s must give
what diffusers' rule gives with its `adjustment` starting at s (and s + 0.01
after a fired special-care concept), computed here from PyTorch's cosines.
"""

from __future__ import annotations

import json
import shutil
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from reference import diffusers_forward
from tritonclient.utils import InferenceServerException

from export import configs
from export.models import Settings
from export.onnx_export import reference_outputs
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.spec import ModelDims
from safety_checker_served.scoring import score_all

MODULES = {"grpc": grpcclient, "http": httpclient}


INVALID_ARG = {"grpc": "INVALID_ARGUMENT", "http": "400"}


@pytest.fixture(scope="module")
def pixels(parity_set) -> np.ndarray:
    """60 plain inputs and every crafted one (test_parity.py runs them all)."""
    return np.concatenate([parity_set.pixels[:60], parity_set.pixels[parity_set.crafted_offset :]])


@pytest.fixture(scope="module")
def reference(pixels, reference_checker):
    cos = reference_outputs(reference_checker, torch.from_numpy(pixels))
    return {
        "forward": diffusers_forward(reference_checker, torch.from_numpy(pixels)),
        "concept_cos": cos[spec.CONCEPT_COSINES.name],
        "special_cos": cos[spec.SPECIAL_COSINES.name],
        "concept_thr": np.array(reference_checker.concept_embeds_weights.tolist(), dtype=np.float64),
        "special_thr": np.array(reference_checker.special_care_embeds_weights.tolist(), dtype=np.float64),
    }


def client_for(server, protocol):
    return SafetyCheckerClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol)


def run(server, pixels, protocol="grpc", strictness=None):
    with client_for(server, protocol) as client:
        return client.check_batch(pixels, strictness)


def unambiguous(reference, strictness: float) -> np.ndarray:
    """Rows whose every score is further than 1e-6 from a rounding boundary at this strictness."""
    margins = np.concatenate(
        [
            reference["concept_cos"].astype(np.float64) - reference["concept_thr"],
            reference["special_cos"].astype(np.float64) - reference["special_thr"],
        ],
        axis=1,
    )
    keep = np.ones(len(margins), dtype=bool)
    for adjustment in (strictness, strictness + 0.01):
        thousandths = (margins + adjustment) * 1000
        keep &= (np.abs(thousandths - np.floor(thousandths) - 0.5) > 1e-3).all(axis=1)
    return keep


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("normal", ["normal", 0.0], ids=["preset", "number"])
def test_normal_is_the_reference(server, pixels, reference, protocol, normal):
    flagged, concept, special = reference["forward"]
    results = run(server, pixels, protocol, normal)
    np.testing.assert_array_equal([r.flagged for r in results], flagged)
    np.testing.assert_allclose([r.concept_scores for r in results], concept, rtol=0, atol=1e-6)
    np.testing.assert_allclose([r.special_scores for r in results], special, rtol=0, atol=1e-6)
    assert {r.strictness_adjustment for r in results} == {0.0}
    default = run(server, pixels, protocol)  # the configured preset is "normal"
    assert [r.as_dict() for r in default] == [r.as_dict() for r in results]


@pytest.mark.parametrize("strictness", ["weak", "medium", "strong", "max", "STRONG", 0.05, -0.1, 0.1, -0.0123])
def test_strictness_shifts_every_threshold(server, pixels, reference, strictness):
    value = spec.STRICTNESS_PRESETS[strictness.lower()] if isinstance(strictness, str) else strictness
    want_flagged, want_concept, want_special, _ = score_all(
        reference["concept_cos"],
        reference["special_cos"],
        reference["concept_thr"],
        reference["special_thr"],
        0.01,
        value,
    )
    results = run(server, pixels, "grpc", strictness)
    keep = unambiguous(reference, value)
    assert keep.mean() > 0.85  # each of 20 scores x 2 adjustments is within 1e-6 of a tie 0.2% of the time
    got_concept = np.array([r.concept_scores for r in results])
    got_special = np.array([r.special_scores for r in results])
    np.testing.assert_array_equal(np.array([r.flagged for r in results])[keep], want_flagged[keep])
    np.testing.assert_allclose(got_concept[keep], want_concept[keep], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_special[keep], want_special[keep], rtol=0, atol=1e-6)
    assert {r.strictness_adjustment for r in results} == {value}
    for r in results:  # the fired list names exactly the positive scores
        names = [f"concept_{i:02d}" for i, s in enumerate(r.concept_scores) if s > 0]
        names += [f"special_care_{i}" for i, s in enumerate(r.special_scores) if s > 0]
        assert r.fired_concepts == names and r.flagged == any(s > 0 for s in r.concept_scores)


def test_stricter_presets_flag_more(server, pixels):
    counts = {name: sum(r.flagged for r in run(server, pixels, "grpc", name)) for name in spec.STRICTNESS_PRESETS}
    ordered = [counts[name] for name in ("weak", "medium", "normal", "strong", "max")]
    assert ordered == sorted(ordered) and ordered[0] < ordered[2] < ordered[-1], counts


def raw_infer(server, protocol, parameters):
    module = MODULES[protocol]
    client = module.InferenceServerClient(server.grpc_url if protocol == "grpc" else server.http_url)
    try:
        pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
        tensor = module.InferInput(spec.PIXEL_VALUES.name, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        return client.infer(spec.ENSEMBLE_MODEL, [tensor], parameters=parameters)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    "parameters, fragments",
    [
        ({"strictness_adjustment": 0.1001}, ["'strictness_adjustment'", "[-0.1, 0.1]"]),
        ({"strictness_adjustment": -0.5}, ["'strictness_adjustment'", "[-0.1, 0.1]"]),
        ({"strictness_adjustment": "nan"}, ["'strictness_adjustment'", "must be a number"]),
        ({"strictness_adjustment": "a lot"}, ["'strictness_adjustment'", "must be a number"]),
        ({"strictness_adjustment": True}, ["'strictness_adjustment'", "must be a number"]),
        (
            {"strictness": "paranoid"},
            ["'strictness'", "unknown preset 'paranoid'", "weak, medium, normal, strong, max"],
        ),
        ({"strictness": 3}, ["'strictness'", "unknown preset 3"]),
        ({"strictness": "weak", "strictness_adjustment": 0.01}, ["both given"]),
    ],
    ids=["above", "below", "nan", "text", "bool", "preset", "number-as-preset", "both"],
)
def test_bad_override_is_refused_and_the_server_keeps_serving(server, protocol, parameters, fragments):
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(server, protocol, parameters)
    message = caught.value.message()
    for fragment in fragments:
        assert fragment in message, message
    assert INVALID_ARG[protocol] in str(caught.value.status())
    result = raw_infer(server, protocol, {"strictness_adjustment": 0.1})  # the bound itself is allowed
    assert result.as_numpy(spec.STRICTNESS_ADJUSTMENT.name).tolist() == [[0.1], [0.1]]


def test_plain_json_request_with_a_strictness_parameter(server):
    """What a curl user sends: KServe v2 JSON with "parameters", reading the new outputs as JSON text."""
    pixels = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    body = {
        "parameters": {"strictness": "strong"},
        "inputs": [
            {"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32", "data": pixels.ravel().tolist()}
        ],
        "outputs": [
            {"name": n}
            for n in (
                "has_nsfw_concepts",
                "fired_concepts",
                "custom_scores",
                "concept_set_version",
                "strictness_adjustment",
            )
        ],
    }
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/safety_checker/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        outputs = {o["name"]: o for o in json.load(response)["outputs"]}
    assert outputs["strictness_adjustment"]["data"] == [0.015]
    assert outputs["fired_concepts"]["datatype"] == "BYTES"
    fired = json.loads(outputs["fired_concepts"]["data"][0])
    assert isinstance(fired, list) and json.loads(outputs["custom_scores"]["data"][0]) == {}
    assert outputs["has_nsfw_concepts"]["data"] == [any(n.startswith("concept_") for n in fired)]
    want = run(server, pixels, "http", "strong")[0]
    assert fired == want.fired_concepts


@pytest.fixture
def repository_copy(repository, tmp_path):
    copy = tmp_path / "repository"
    shutil.copytree(repository, copy)
    return copy


def test_configured_preset(repository_copy, pixels, reference, server):
    from safety_checker_admin.server import TritonServer, free_port

    dims = ModelDims(17, 3, 16)
    strong = configs.render_all(dims, Settings(strictness="strong"))[configs.POSTPROCESS_CONFIG]
    (repository_copy / configs.POSTPROCESS_CONFIG).write_text(strong)
    pixels = pixels[:40]
    with TritonServer(
        repository_copy, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    ) as strong_server:
        default = run(strong_server, pixels)
        normal = run(strong_server, pixels, strictness="normal")
    assert {r.strictness_adjustment for r in default} == {0.015}
    assert [r.as_dict() for r in default] == [r.as_dict() for r in run(server, pixels, strictness="strong")]
    flagged, concept, _ = reference["forward"]
    np.testing.assert_array_equal([r.flagged for r in normal], flagged[:40])
    np.testing.assert_allclose([r.concept_scores for r in normal], concept[:40], rtol=0, atol=1e-6)


@pytest.mark.server
def test_unknown_configured_preset_stops_the_model_loading(repository_copy):
    from safety_checker_admin.server import ServerError, TritonServer, free_port

    config = repository_copy / configs.POSTPROCESS_CONFIG
    config.write_text(config.read_text().replace('string_value: "normal"', 'string_value: "lenient"'))
    with pytest.raises(ServerError, match="config parameter strictness: unknown preset 'lenient'"):
        TritonServer(repository_copy, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()).start(60)


def test_render_refuses_an_unknown_preset():
    with pytest.raises(ValueError, match="unknown strictness preset"):
        configs.render_all(spec.REFERENCE_DIMS, Settings(strictness="lenient"))
