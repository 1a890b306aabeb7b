"""The optional int8 embedder: the stress arithmetic by hand, the export's report, and serving it.

`export.stress.stress_agreement` is checked against decisions worked out by
hand from the rule itself (score = round(cos - threshold + adjustment, 3),
half to even; an image is flagged when a concept score is > 0), not against
a second copy of the code. The export runs end to end on a tiny checker, and
the int8 repository it writes is served by a real tritonserver.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import run_export
from crafting import calibrate_thresholds, varied_inputs
from reference import diffusers_forward

from export.quantize import REPORT_FILENAME, summary
from export.stress import CASCADE_MARGINS, PLAIN_MARGINS, stress_agreement
from fixtures.checkers import THRESHOLDS, build_checker, save_checker
from fixtures.photos import photos
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.preprocess import normalize, preprocess_uint8

ADJUSTMENT = 0.01
MARGINS_PER_CONCEPT = 10
QUANTISED_OPS = {"DynamicQuantizeLinear", "MatMulInteger"}


# -- stress_agreement, by hand ----------------------------------------------------------------------
#
# stress_agreement puts one concept of a virtual image at threshold + margin
# (+ the other model's deviation for that image and concept), every other
# concept 0.1 below its threshold, and the special-care concepts 0.1 below
# theirs, or, for the cascade margins, the first one 0.1 above its threshold,
# which adds 0.01 to every concept score. So each case is decided by one
# score: round(margin [+ 0.01] [+ deviation], 3) > 0.
#
#  margin (+0.01)       fp32 score        +1e-3 score         -1e-3 score        +3e-4 score
#  0.0004               0.0004 ->  0.000  0.0014 ->  0.001 x  -0.0006 -> -0.001  0.0007 -> 0.001 x
#  0.000498             0.000498 -> 0.000 0.001498 -> 0.001 x -0.000502 -> -0.001 0.000798 -> 0.001 x
#  0.000502             0.000502 -> 0.001 0.001502 -> 0.002   -0.000498 -> -0.000 x 0.000802 -> 0.001 =
#  0.0006               0.0006 ->  0.001  0.0016 ->  0.002    -0.0004 -> -0.000 x  0.0009 -> 0.001 =
#  -0.0004              -0.0004 -> -0.000 0.0006 ->  0.001 x  -0.0014 -> -0.001    -0.0001 -> -0.000 =
#  -0.0006              -0.0006 -> -0.001 0.0004 ->  0.000    -0.0016 -> -0.002    -0.0003 -> -0.000
#  -0.0094 + 0.01       0.0006 ->  0.001  0.0016 ->  0.002    -0.0004 -> -0.000 x  0.0009 -> 0.001 =
#  -0.009502 + 0.01     0.000498 -> 0.000 0.001498 -> 0.001 x -0.000502 -> -0.001  0.000798 -> 0.001 x
#  -0.009498 + 0.01     0.000502 -> 0.001 0.001502 -> 0.002   -0.000498 -> -0.000 x 0.000802 -> 0.001 =
#  -0.0096 + 0.01       0.0004 ->  0.000  0.0014 ->  0.001 x  -0.0006 -> -0.001    0.0007 -> 0.001 x
#
# (x: the decision flips; =: same score as fp32.) Decisions agree at
# +1e-3: 10 - 5 = 5 of 10; -1e-3: 10 - 4 = 6 of 10; +3e-4: 10 - 4 = 6 of 10.
# Scores: at +-1e-3 every score moves by exactly 0.001 (none agrees); at +3e-4
# five of ten stay. A deviation of +5e-3 moves every score by exactly 0.005
# and flips six decisions (all but the four fp32 already flags).
# The nearest of these to a rounding tie is 2e-6 away; float32 cosines near
# 0.2 carry errors of about 1e-8, far below that.
HAND = {  # deviation: (decision agreements of 10 margins, score agreements of 10, max score deviation)
    0.0: (10, 10, 0.0),
    1e-3: (5, 0, 0.001),
    -1e-3: (6, 0, 0.001),
    3e-4: (6, 5, 0.001),
    5e-3: (4, 0, 0.005),
}


def test_the_margins_are_the_ones_derived_by_hand():
    """The table above is for exactly these margins."""
    assert PLAIN_MARGINS == pytest.approx((0.0004, 0.000498, 0.000502, 0.0006, -0.0004, -0.0006), abs=1e-12)
    assert CASCADE_MARGINS == pytest.approx((-0.0094, -0.009502, -0.009498, -0.0096), abs=1e-12)


def _thresholds(kind: str):
    concept = np.array(THRESHOLDS["concept_embeds_weights"], dtype=np.float64)
    special = np.array(THRESHOLDS["special_care_embeds_weights"], dtype=np.float64)
    if kind == "float32":  # what the export writes: the float32 parameters' exact values
        concept = concept.astype(np.float32).astype(np.float64)
        special = special.astype(np.float32).astype(np.float64)
    return concept, special


def _fp32_cosines(images: int, seed: int = 0) -> np.ndarray:
    """Realistic float32 concept cosines: around the published thresholds."""
    concept, _ = _thresholds("json")
    rng = np.random.default_rng(seed)
    return (concept + rng.uniform(-0.05, 0.05, size=(images, concept.size))).astype(np.float32)


def _shifted(fp32: np.ndarray, deviation) -> np.ndarray:
    """The other model's float32 cosines: fp32 + deviation, rounded to float32 as a model outputs them."""
    return (fp32.astype(np.float64) + deviation).astype(np.float32)


@pytest.mark.parametrize("thresholds", ["json", "float32"])
@pytest.mark.parametrize("deviation", sorted(HAND))
def test_uniform_deviation(thresholds, deviation):
    concept_thr, special_thr = _thresholds(thresholds)
    images = 3
    fp32 = _fp32_cosines(images)
    result = stress_agreement(fp32, _shifted(fp32, deviation), concept_thr, special_thr, ADJUSTMENT)
    decisions, scores, worst = HAND[deviation]
    assert result["cases"] == images * 17 * MARGINS_PER_CONCEPT
    assert result["decision_agreement"] == decisions / MARGINS_PER_CONCEPT
    assert result["score_agreement"] == scores / MARGINS_PER_CONCEPT
    assert result["max_score_deviation"] == pytest.approx(worst, abs=1e-12)


def test_no_deviation_agrees_everywhere():
    concept_thr, special_thr = _thresholds("float32")
    fp32 = _fp32_cosines(5, seed=1)
    assert stress_agreement(fp32, fp32.copy(), concept_thr, special_thr, ADJUSTMENT) == {
        "cases": 5 * 17 * 10,
        "decision_agreement": 1.0,
        "score_agreement": 1.0,
        "max_score_deviation": 0.0,
    }


def test_each_image_and_concept_carries_its_own_deviation():
    """Mixed deviations: the fractions are the per-cell hand counts summed, and one +5e-3 cell is the worst."""
    concept_thr, special_thr = _thresholds("float32")
    images = 4
    rng = np.random.default_rng(3)
    deviation = rng.choice([0.0, 1e-3, -1e-3, 3e-4], size=(images, 17))
    deviation[2, 9] = 5e-3
    fp32 = _fp32_cosines(images, seed=2)
    result = stress_agreement(fp32, _shifted(fp32, deviation), concept_thr, special_thr, ADJUSTMENT)
    cases = images * 17 * MARGINS_PER_CONCEPT
    assert result["cases"] == cases
    assert result["decision_agreement"] == sum(HAND[d][0] for d in deviation.ravel()) / cases
    assert result["score_agreement"] == sum(HAND[d][1] for d in deviation.ravel()) / cases
    assert result["max_score_deviation"] == pytest.approx(0.005, abs=1e-12)
    assert 0.0 < result["decision_agreement"] < 1.0  # the mix really contains flips


# -- the export, end to end ---------------------------------------------------------------------------

CHECK_IMAGES = 6


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory) -> Path:
    """Thresholds calibrated like the parity checker's, so that the served images get both
    decisions and the special-care cascade (the published ones flag every image of a random tiny model)."""
    checker = build_checker(seed=5)
    calibrate_thresholds(checker, varied_inputs(np.random.default_rng(5), 60))
    return save_checker(tmp_path_factory.mktemp("int8-checker") / "tiny-checker", checker)


@pytest.fixture(scope="module")
def int8_export(checker_dir, tmp_path_factory):
    repository = tmp_path_factory.mktemp("int8-repository")
    result = run_export(checker_dir, repository, "--int8", "--int8-check-images", str(CHECK_IMAGES))
    assert result.returncode == 0, result.stdout + result.stderr
    return result, repository


@pytest.fixture(scope="module")
def fp32_export(checker_dir, tmp_path_factory):
    repository = tmp_path_factory.mktemp("fp32-repository")
    result = run_export(checker_dir, repository)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, repository


def _embedder_file(repository: Path) -> Path:
    return repository / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME


def _report(repository: Path) -> dict:
    return json.loads((repository / spec.EMBEDDER_MODEL / "1" / REPORT_FILENAME).read_text())


@pytest.mark.slow
def test_int8_export_states_its_cost(int8_export):
    result, repository = int8_export
    report = _report(repository)
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("int8 vs fp32:")] == [summary(report)], result.stdout
    assert "int8 embedder" in lines[-1]

    assert report["max_cosine_deviation"] > 0  # really quantised, not a copy of fp32
    random, stress = report["random_inputs"], report["stress_margins"]
    assert random["images"] == CHECK_IMAGES
    assert 0 <= random["flagged_fp32"] <= CHECK_IMAGES
    assert stress["cases"] == CHECK_IMAGES * 17 * MARGINS_PER_CONCEPT
    for fraction in (random["decision_agreement"], stress["decision_agreement"], stress["score_agreement"]):
        assert 0.0 <= fraction <= 1.0
    # The stress cases keep the cascade state fixed, so a score moves at most by the
    # cosine deviation plus the two roundings.
    assert 0.0 <= stress["max_score_deviation"] <= report["max_cosine_deviation"] + 0.001 + 1e-9


@pytest.mark.slow
def test_served_file_is_quantised_and_labelled(int8_export, fp32_export):
    (_, int8_repository), (fp32_result, fp32_repository) = int8_export, fp32_export
    int8_model = onnx.load(str(_embedder_file(int8_repository)))
    fp32_model = onnx.load(str(_embedder_file(fp32_repository)))
    int8_ops = {node.op_type for node in int8_model.graph.node}
    fp32_ops = {node.op_type for node in fp32_model.graph.node}
    assert int8_ops & QUANTISED_OPS, sorted(int8_ops)
    assert not fp32_ops & QUANTISED_OPS, sorted(fp32_ops)
    # The served interface is the same either way.
    for model in (int8_model, fp32_model):
        assert [i.name for i in model.graph.input] == [t.name for t in spec.EMBEDDER_INPUTS]
        assert [o.name for o in model.graph.output] == [t.name for t in spec.EMBEDDER_OUTPUTS]

    assert (int8_repository / spec.EMBEDDER_MODEL / "1" / REPORT_FILENAME).is_file()
    assert not (fp32_repository / spec.EMBEDDER_MODEL / "1" / REPORT_FILENAME).exists()
    assert "int8 vs fp32" not in fp32_result.stdout
    assert "fp32 embedder" in fp32_result.stdout.splitlines()[-1]


# -- serving the int8 repository -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_server(int8_export):
    from safety_checker_admin.server import TritonServer, free_port

    _, repository = int8_export
    triton = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    triton.start()
    yield triton
    triton.stop()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Real photos resized and cropped by the client, and a few synthetic uint8 images."""
    rng = np.random.default_rng(17)
    real = preprocess_uint8(list(photos().values()))
    noise = rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    blocks = np.kron(rng.integers(0, 256, size=(3, 7, 7, 3)), np.ones((1, 32, 32, 1))).astype(np.uint8)
    return np.concatenate([real, noise, blocks])


def _local_cosines(onnx_file: Path, pixels: np.ndarray) -> np.ndarray:
    """[N, 17 + 3] cosines of one batch, the way the served model runs it (one session run)."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    concept, special = session.run(
        [spec.CONCEPT_COSINES.name, spec.SPECIAL_COSINES.name], {spec.PIXEL_VALUES.name: pixels}
    )
    return np.concatenate([concept, special], axis=1).astype(np.float64)


def _adjustments(special_scores: np.ndarray) -> np.ndarray:
    """[N, 17 + 3] adjustment each score had: 0.01 after a fired special-care concept."""
    fired = special_scores > 0
    before = np.zeros_like(fired)
    before[:, 1:] = np.cumsum(fired, axis=1)[:, :-1] > 0
    concept = np.repeat(fired.any(axis=1, keepdims=True), 17, axis=1)
    return ADJUSTMENT * np.concatenate([concept, before], axis=1)


def test_int8_repository_serves_within_its_measured_deviation(
    int8_server, int8_export, fp32_export, checker_dir, images
):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    (_, int8_repository), (_, fp32_repository) = int8_export, fp32_export
    pixels = normalize(images)
    assert len(pixels) <= 32  # one request, so the server runs exactly this batch

    with SafetyCheckerClient(int8_server.grpc_url) as client:
        served = client.check_batch(pixels)
    assert len(served) == len(pixels)
    got_scores = np.array([r.concept_scores + r.special_scores for r in served])
    got_special = np.array([r.special_scores for r in served])
    assert [r.flagged for r in served] == (got_scores[:, :17] > 0).any(axis=1).tolist()

    reference = StableDiffusionSafetyChecker.from_pretrained(str(checker_dir)).eval()
    want_flagged, want_concept, want_special = diffusers_forward(reference, torch.from_numpy(pixels))
    want_scores = np.concatenate([want_concept, want_special], axis=1)
    # Not vacuous: both decisions, and the special-care cascade, occur on these images.
    assert 0 < want_flagged.sum() < len(pixels) and (want_special > 0).any()

    # What int8 costs on these very inputs (dynamic quantisation depends on the
    # batch): the int8 and fp32 files run directly. fp32 ONNX differs from
    # PyTorch by at most the export's 1e-5; each rounding moves a score by at
    # most 0.0005; a special-care concept that fires in one and not the other
    # shifts the later scores by the 0.01 adjustment.
    deviation = np.max(
        np.abs(
            _local_cosines(_embedder_file(int8_repository), pixels)
            - _local_cosines(_embedder_file(fp32_repository), pixels)
        )
    )
    assert deviation > 0
    tolerance = deviation + 1e-5 + 0.001 + np.abs(_adjustments(got_special) - _adjustments(want_special)) + 1e-9
    excess = np.abs(got_scores - want_scores) - tolerance
    assert (excess <= 0).all(), (deviation, np.argwhere(excess > 0), np.max(excess))
    assert (got_scores != want_scores).any(), "the int8 repository answers exactly like fp32"


def test_uint8_ensemble_serves_the_int8_embedder(int8_server, images):
    with (
        SafetyCheckerClient(int8_server.grpc_url, uint8=True) as client_uint8,
        SafetyCheckerClient(int8_server.grpc_url) as client_float,
    ):
        assert client_uint8.model_name == spec.UINT8_ENSEMBLE_MODEL
        got = client_uint8.check_batch(images)
        want = client_float.check_batch(normalize(images))
    assert len(got) == len(images)
    # The server normalises to exactly the client's pixels, and the int8 embedder sees the same batch.
    assert [r.as_dict() for r in got] == [r.as_dict() for r in want]
