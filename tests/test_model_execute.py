"""Every served Python model's `execute`, in-process: no tritonserver, a stand-in for its Python stub.

Each model is initialised from the config `export.configs.render_all` renders
for it (as Triton passes it: `fake_triton.triton_config`) and a version folder
laid out as the export lays it out, with a tiny checker. Batches of several
requests go through `execute`; good requests must get what the package
functions and the client's preprocessing compute, a bad request among them its
INVALID_ARG refusal, and the others of its batch their answers as if it had not
been there. The cascade's BLS calls reach the real runner and postprocessor.
The end-to-end tests through tritonserver (test_parity.py, test_images.py,
test_cascade.py, ...) hold the same answers to diffusers' own forward().
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import fake_triton
import numpy as np
import pytest
from image_files import bad_elements, encode, picture, small_png

from export.configs import render_all
from export.graph import EmbedderGraph
from export.models import Settings
from export.normalize import write_normalizer
from export.onnx_export import export_onnx
from export.quantize import compare_int8, quantize_int8
from export.repository import concept_metadata, model_dims
from fixtures.checkers import TINY_PROJECTION_DIM, build_checker
from safety_checker_client import spec
from safety_checker_client.preprocess import normalize, open_image, preprocess_uint8
from safety_checker_client.spec import ModelDims
from safety_checker_served import concept_set, concept_writer, scoring
from safety_checker_served.concept_watch import RECENT_WRITE_S, RETRY_INTERVAL_S, CustomConceptFile
from safety_checker_served.session import onnx_session

DIMS = ModelDims(num_concepts=17, num_special=3, projection_dim=TINY_PROJECTION_DIM)
PYTHON_MODELS = (
    spec.DECODE_MODEL,
    spec.NORMALIZE_MODEL,
    spec.EMBEDDER_MODEL,
    spec.INT8_EMBEDDER_MODEL,
    spec.POSTPROCESS_MODEL,
    spec.CASCADE_MODEL,
    spec.VIEWS_MODEL,
)
EMBEDDERS = (spec.EMBEDDER_MODEL, spec.INT8_EMBEDDER_MODEL)
# A cascade export renders every Python model (the postprocessor's cosine_bound is the cascade's to send).
CASCADE = Settings(cascade=True)
INVALID_ARG = fake_triton.TritonError.INVALID_ARG
INTERNAL = fake_triton.TritonError.INTERNAL
EMBEDDED = [t.name for t in spec.EMBEDDER_OUTPUTS]
SCORED = [t.name for t in spec.POSTPROCESS_INPUTS if not t.optional]


def python_config(model: str, settings: Settings = CASCADE) -> str:
    """The one config of `model` that runs on the Python backend (config.pbtxt or configs/cpu.pbtxt)."""
    (text,) = [
        text
        for path, text in render_all(DIMS, settings).items()
        if path.parts[0] == model and 'backend: "python"' in text
    ]
    return text


@dataclass
class Repository:
    root: Path
    server: fake_triton.Server
    metadata: Dict[str, Any]
    custom: concept_set.ConceptSet
    pool: np.ndarray  # float32 pixel_values: noise, gradients and blocks
    int8_bound: float  # the int8 embedder's error bound, measured as the export measures it

    def model(self, name: str) -> fake_triton.LoadedModel:
        return self.server.models[name]

    def load(self, name: str, settings: Settings = CASCADE, **parameters: str) -> fake_triton.LoadedModel:
        """Another instance of `name` in this repository (BLS still reaches the registered ones)."""
        return self.server.load(name, self.root / name, python_config(name, settings), parameters, register=False)

    def thresholds(self):
        concepts = np.array([c["threshold"] for c in self.metadata["concepts"]], dtype=np.float64)
        special = np.array([c["threshold"] for c in self.metadata["special_care"]], dtype=np.float64)
        return concepts, special, float(self.metadata["special_care_adjustment"])

    def session(self, name: str):
        """onnxruntime on the model's own model.onnx, with the session options its config asks for."""
        model = self.model(name)
        return onnx_session(str(self.root / name / "1" / spec.ONNX_FILENAME), model.parameters)


def custom_set(rng: np.random.Generator, names: Sequence[str], version: int) -> concept_set.ConceptSet:
    concepts = tuple(
        concept_set.make_concept(name, rng.standard_normal(TINY_PROJECTION_DIM), 0.1, {"kind": "text", "text": name})
        for name in names
    )
    return concept_set.ConceptSet(version=version, embedding_dim=TINY_PROJECTION_DIM, concepts=concepts)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repository:
    """A cascade repository of a tiny checker whose thresholds make some images flagged, every model loaded."""
    from crafting import calibrate_thresholds, varied_inputs
    from PIL import Image

    pillow_limit = Image.MAX_IMAGE_PIXELS  # the decoder sets Pillow's bomb limit for the whole process
    fake_triton.install()
    root = tmp_path_factory.mktemp("repository")
    rng = np.random.default_rng(20261128)
    checker = build_checker(seed=11)
    pool = varied_inputs(rng, 40)
    calibrate_thresholds(checker, pool)
    for name in PYTHON_MODELS:
        (root / name / "1").mkdir(parents=True)
    fp32 = root / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME
    export_onnx(EmbedderGraph(checker), fp32)
    quantize_int8(fp32, root / spec.INT8_EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME)
    write_normalizer(root / spec.NORMALIZE_MODEL / "1" / spec.ONNX_FILENAME)
    assert model_dims(checker) == DIMS
    metadata = concept_metadata(checker, "tiny test checker")
    version = root / spec.POSTPROCESS_MODEL / "1"
    (version / spec.CONCEPTS_FILENAME).write_text(json.dumps(metadata, indent=2) + "\n")
    custom = custom_set(rng, ["stripes", "dots"], version=3)
    concept_writer.write(version / spec.CUSTOM_CONCEPTS_FILENAME, custom)
    server = fake_triton.Server()
    for name in PYTHON_MODELS:
        server.load(name, root / name, python_config(name))
    bound = compare_int8(fp32, root / spec.INT8_EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME, metadata)["cosine_bound"]
    yield Repository(root, server, metadata, custom, pool, bound)
    fake_triton.uninstall()
    Image.MAX_IMAGE_PIXELS = pillow_limit


# -- requests and what they must get -----------------------------------------------------------------------
def pixels(repo: Repository, start: int, count: int) -> np.ndarray:
    return repo.pool[start : start + count].copy()


def good_inputs(repo: Repository, model: str, count: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """`count` images as `model` takes them."""
    rng = np.random.default_rng(seed)
    if model == spec.DECODE_MODEL:
        return {spec.IMAGE.name: np.array([[small_png(seed + i)] for i in range(count)], dtype=object)}
    if model == spec.NORMALIZE_MODEL:
        return {spec.IMAGES.name: rng.integers(0, 256, (count, *spec.IMAGES.dims), dtype=np.uint8)}
    if model == spec.POSTPROCESS_MODEL:
        return cosines(repo, rng, count)
    if model == spec.VIEWS_MODEL:
        return per_view_answers(rng, [[(0, 0, False)]] * count)
    return {spec.PIXEL_VALUES.name: pixels(repo, seed, count)}


def per_view_answers(rng: np.random.Generator, files: Sequence[Sequence[tuple]]) -> Dict[str, np.ndarray]:
    """What the views model takes: a made-up answer per view (random scores; each view flagged as its tuple
    says) and the decoder's `views`, for files given as lists of (frame, alpha dropped, flagged)."""
    rows = [(index, frame, dropped, flag) for index, views in enumerate(files) for frame, dropped, flag in views]
    count = len(rows)
    dtypes = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}
    inputs: Dict[str, np.ndarray] = {}
    for tensor in spec.PER_VIEW_OUTPUTS:
        shape = (count, *tensor.resolve(DIMS))
        if tensor.datatype == "BYTES":
            inputs[tensor.name] = np.array([[json.dumps([i]).encode()] for i in range(count)], dtype=object)
        elif tensor.datatype == "BOOL":
            inputs[tensor.name] = rng.random(shape) < 0.5
        else:
            inputs[tensor.name] = rng.standard_normal(shape).astype(dtypes[tensor.datatype])
    inputs[spec.PER_VIEW_OUTPUTS[0].name] = np.array([[flag] for *_, flag in rows], dtype=bool)
    inputs[spec.VIEWS.name] = np.array([row[:3] for row in rows], dtype=np.int32).reshape(-1, 3)
    return inputs


def cosines(repo: Repository, rng: np.random.Generator, count: int) -> Dict[str, np.ndarray]:
    """The postprocessor's inputs: cosines within a few thousandths of every threshold, so that scores of
    both signs and fired special-care concepts turn up."""
    concept_thr, special_thr, _ = repo.thresholds()
    return {
        spec.CONCEPT_COSINES.name: (concept_thr + rng.uniform(-0.02, 0.01, (count, DIMS.num_concepts))).astype(
            np.float32
        ),
        spec.SPECIAL_COSINES.name: (special_thr + rng.uniform(-0.01, 0.01, (count, DIMS.num_special))).astype(
            np.float32
        ),
        spec.NONFINITE_VALUES.name: np.zeros((count, 1), dtype=np.int64),
        spec.IMAGE_EMBEDS.name: rng.standard_normal((count, DIMS.projection_dim)).astype(np.float32),
    }


def refusal(response: fake_triton.InferenceResponse):
    assert response.has_error(), f"answered: {sorted(response.outputs())}"
    return response.error().code(), response.error().message()


def answers(response: fake_triton.InferenceResponse) -> Dict[str, np.ndarray]:
    assert not response.has_error(), response.error()
    return response.outputs()


def assert_same(got: Dict[str, np.ndarray], want: Dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        nan = want[name].dtype.kind == "f"  # NaN where onnxruntime gives NaN
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name], equal_nan=nan), name


def scored(
    repo: Repository,
    inputs: Dict[str, np.ndarray],
    strictness: np.ndarray,
    bound: np.ndarray,
    custom: Optional[concept_set.ConceptSet] = None,
) -> Dict[str, Any]:
    """What the postprocessor must answer, from the package's scoring and the contract's description of each
    output; `strictness` and `bound` hold one value per image."""
    custom = repo.custom if custom is None else custom
    concept_thr, special_thr, adjustment = repo.thresholds()
    concept_cos, special_cos = inputs[spec.CONCEPT_COSINES.name], inputs[spec.SPECIAL_COSINES.name]
    custom_cos = scoring.cosines(inputs[spec.IMAGE_EMBEDS.name], custom.unit_embeddings())
    margins = (concept_cos, special_cos, concept_thr, special_thr, adjustment, strictness, custom_cos)
    scores = scoring.score_all(*margins, custom.thresholds())
    fired = []
    for i in range(len(strictness)):
        names = [f"concept_{j:02d}" for j, s in enumerate(scores.concept_scores[i]) if s > 0]
        names += [f"special_care_{j}" for j, s in enumerate(scores.special_scores[i]) if s > 0]
        names += [n for n, s in zip(custom.names, scores.custom_scores[i]) if s > 0]
        fired.append(names)
    return {
        spec.HAS_NSFW_CONCEPTS.name: scores.flagged.reshape(-1, 1),
        spec.CONCEPT_SCORES.name: scores.concept_scores.astype(np.float32),
        spec.SPECIAL_SCORES.name: scores.special_scores.astype(np.float32),
        spec.FIRED_CONCEPTS.name: fired,
        spec.CUSTOM_SCORES.name: [
            {n: round(float(s), 3) for n, s in zip(custom.names, row)} for row in scores.custom_scores
        ],
        spec.CUSTOM_COSINES.name: [dict(zip(custom.names, row)) for row in custom_cos],
        spec.CONCEPT_SET_VERSION.name: np.full((len(strictness), 1), custom.version, dtype=np.int64),
        spec.STRICTNESS_ADJUSTMENT.name: np.asarray(strictness, dtype=np.float64).reshape(-1, 1),
        spec.EXACT_SCORES.name: (np.asarray(bound) == 0).reshape(-1, 1),
        spec.DECISION_CERTAIN.name: scoring.certain(*margins, custom.thresholds(), bound).reshape(-1, 1),
    }


def scored_batch(
    repo: Repository,
    batch: Sequence[Dict[str, np.ndarray]],
    strictness: Sequence[float],
    bounds: Optional[Sequence[np.ndarray]] = None,
    custom: Optional[concept_set.ConceptSet] = None,
) -> List[Dict[str, Any]]:
    """`scored` for each request of one execute(): the postprocessor scores a batch as a whole (its custom
    cosines are one float32 matmul, whose last bit may depend on the batch's size), then splits it."""
    sizes = [len(inputs[spec.CONCEPT_COSINES.name]) for inputs in batch]
    bounds = [np.zeros(n) for n in sizes] if bounds is None else bounds
    whole = {name: np.concatenate([inputs[name] for inputs in batch]) for name in SCORED}
    everything = scored(repo, whole, per_image(strictness, sizes), np.concatenate(bounds), custom)
    ends = np.cumsum(sizes)
    return [{name: value[end - size : end] for name, value in everything.items()} for size, end in zip(sizes, ends)]


def assert_scored(got: Dict[str, np.ndarray], want: Dict[str, Any]) -> None:
    """The outputs equal, the JSON ones read back (custom cosines to the float32 they print)."""
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        value = got[name]
        if name in (spec.FIRED_CONCEPTS.name, spec.CUSTOM_SCORES.name):
            assert value.dtype == object and value.shape == (len(expected), 1), name
            assert [json.loads(v) for v in value.reshape(-1)] == expected, name
        elif name == spec.CUSTOM_COSINES.name:
            read = [json.loads(v) for v in value.reshape(-1)]
            assert [list(r) for r in read] == [list(e) for e in expected]
            assert all(np.float32(r[n]) == e[n] for r, e in zip(read, expected) for n in e), name
        else:
            assert value.dtype == expected.dtype and np.array_equal(value, expected), name


def per_image(values: Sequence[float], sizes: Sequence[int]) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.float64), sizes)


def rows(inputs: Dict[str, np.ndarray], where) -> Dict[str, np.ndarray]:
    return {name: value[where] for name, value in inputs.items()}


# -- every model -----------------------------------------------------------------------------------------
def test_every_python_model_is_initialised_from_its_rendered_config(repo):
    rendered = render_all(DIMS, CASCADE)
    python = {path.parts[0] for path, text in rendered.items() if 'backend: "python"' in text}
    assert python == set(PYTHON_MODELS), "a Python model without execute() tests here"
    for name in PYTHON_MODELS:
        config = repo.model(name).config
        assert config["name"] == name and config["backend"] == "python"
        # What Triton passes: dims as numbers (protobuf's JSON writes int64 as strings; ModelConfigToJson fixes them).
        assert all(isinstance(d, int) for t in config["input"] + config["output"] for d in t["dims"])
        assert config["parameters"]["max_request_images"]["string_value"] == str(config["max_batch_size"])
    logged = [message for _, message in fake_triton.LOG]
    assert any(m.startswith("decoding PNG, JPEG, WEBP, GIF, BMP, TIFF files of at most 20971520 bytes") for m in logged)
    assert (
        "strictness preset 'normal' (adjustment +0); custom concept set version 3 (2 concepts: stripes, dots)" in logged
    )


@pytest.mark.parametrize("name", PYTHON_MODELS)
def test_a_request_beyond_the_limits_is_refused_and_its_batch_mates_answered(repo, name):
    """request_limits in every model: each bad request gets INVALID_ARG with its reason, and the good ones of
    the same execute get exactly what they get without it. The config allows 2 images a request here, so that
    a larger one gets past Triton's own max_batch_size check."""
    model = repo.load(name, max_request_images="2")
    reserved = {"priority": 1, "binary_data_output": True, "timeout": 1000}
    goods = [
        fake_triton.request(good_inputs(repo, name, 1, seed=0)),
        fake_triton.request(good_inputs(repo, name, 2, seed=1), {"strictness": "weak"}),
        fake_triton.request(good_inputs(repo, name, 2, seed=3), reserved),
    ]
    bad = {
        "unknown request parameter 'strictnes'; accepted: strictness, strictness_adjustment (and Triton's "
        "reserved sequence_id, sequence_start, sequence_end, priority, timeout, binary_data_output, "
        "triton_enable_empty_final_response)": {"strictnes": "weak"},
        "request parameter 'strictness' is given more than once": '{"strictness":"weak","strictness":"max"}',
        "request parameters take 2017 bytes, more than the 1024 allowed": {"strictness": "x" * 2000},
        "request parameters are not readable": "{strictness: weak}",
    }
    batch = [goods[0], *(fake_triton.request(good_inputs(repo, name, 1), p) for p in bad.values())]
    batch += [fake_triton.request(good_inputs(repo, name, 3, seed=5)), goods[1], goods[2]]
    responses = model.execute(batch)
    for response, message in zip(responses[1:6], [*bad, "a request holds at most 2 images, this one 3"]):
        assert refusal(response) == (INVALID_ARG, message)
    answered = [responses[0], *responses[6:]]
    if name == spec.POSTPROCESS_MODEL:  # it scores the whole batch in one pass, refused requests included
        inputs = [{t.name(): t.as_numpy() for t in request.inputs()} for request in batch]
        strictness = [0.0] * 6 + [spec.STRICTNESS_PRESETS["weak"], 0.0]
        expected = scored_batch(repo, inputs, strictness)
        for response, want in zip(answered, [expected[0], *expected[6:]]):
            assert_scored(answers(response), want)
    else:  # the refused requests' images went nowhere: the others' batch is the same without them
        for response, alone in zip(answered, model.execute(goods)):
            assert_same(answers(response), answers(alone))


def test_request_parameters_that_are_a_json_array_are_refused_alone(repo):
    model = repo.model(spec.NORMALIZE_MODEL)
    good = fake_triton.request(good_inputs(repo, spec.NORMALIZE_MODEL, 1))
    responses = model.execute([good, fake_triton.request(good_inputs(repo, spec.NORMALIZE_MODEL, 1), "[1, 2]")])
    assert refusal(responses[1]) == (INVALID_ARG, "request parameters are not readable")
    answers(responses[0])


# -- safety_checker_decode ---------------------------------------------------------------------------------
def image_files() -> Dict[str, bytes]:
    from PIL import Image

    pictures = [Image.fromarray(picture(seed, 301 + seed, 457 - seed)) for seed in range(4)]
    return {
        "png": encode(pictures[0], "PNG"),
        "jpeg": encode(pictures[1], "JPEG", quality=90),
        "webp": encode(pictures[2], "WEBP", lossless=True),
        "gif": encode(pictures[3].convert("L"), "GIF"),
    }


def elements(*files: bytes) -> np.ndarray:
    return np.array([[f] for f in files], dtype=object)


def test_decode_gives_each_request_the_clients_uint8_images(repo):
    """Raw files and their base64 text (what a JSON request carries, wrapped or not) decode to what the
    client's open_image and preprocess_uint8 make of the same file, bit for bit."""
    import io

    files = image_files()
    raw, text, wrapped = (lambda f: f), base64.b64encode, base64.encodebytes  # encodebytes wraps at 76 columns
    requests = [[("png", raw), ("jpeg", text)], [("webp", raw)], [("gif", wrapped), ("png", text), ("jpeg", raw)]]
    responses = repo.model(spec.DECODE_MODEL).execute(
        [fake_triton.request({spec.IMAGE.name: elements(*(form(files[f]) for f, form in r))}) for r in requests]
    )
    for request, response in zip(requests, responses):
        expected = preprocess_uint8([open_image(io.BytesIO(files[f])) for f, _ in request])
        views = np.array([(i, 0, 0) for i in range(len(request))], dtype=np.int32)  # still and opaque: one view each
        assert_same(answers(response), {spec.IMAGES.name: expected, spec.VIEWS.name: views})


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # silenced at initialize, for good
@pytest.mark.parametrize("case", sorted(bad_elements()))
def test_decode_refuses_a_request_with_a_bad_file_and_decodes_the_others(repo, case):
    element, reason = bad_elements()[case]
    model = repo.model(spec.DECODE_MODEL)
    first, last = elements(small_png(1), small_png(2)), elements(small_png(3))
    responses = model.execute(
        [fake_triton.request({spec.IMAGE.name: f}) for f in (first, elements(small_png(4), element), last)]
    )
    code, message = refusal(responses[1])
    assert code == INVALID_ARG and message.startswith("image 1: ") and reason in message, message
    assert message.endswith("; nothing in this request was checked")
    alone = model.execute([fake_triton.request({spec.IMAGE.name: f}) for f in (first, last)])
    for response, expected in zip((responses[0], responses[2]), alone):
        assert_same(answers(response), answers(expected))


# -- safety_checker_normalize ------------------------------------------------------------------------------
def test_normalize_gives_the_clients_pixel_values(repo):
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, 256, (n, *spec.IMAGES.dims), dtype=np.uint8) for n in (1, 3, 2)]
    batches[1].reshape(-1)[:256] = np.arange(256)  # every level
    responses = repo.model(spec.NORMALIZE_MODEL).execute([fake_triton.request({spec.IMAGES.name: b}) for b in batches])
    for batch, response in zip(batches, responses):
        assert_same(answers(response), {spec.PIXEL_VALUES.name: normalize(batch)})


def test_normalize_serves_its_onnx_graph_as_a_numpy_lookup(repo):
    """On CPU the normaliser's model.onnx is tabulated at load and served by NumPy: its session is the table."""
    from safety_checker_served.lookup_runner import TabulatedSession  # imports the stand-in pb_utils

    model = repo.model(spec.NORMALIZE_MODEL)
    session = model.instance.session
    assert isinstance(session, TabulatedSession)
    assert session.table.shape == (spec.NUM_CHANNELS, 256)
    every_level = np.repeat(np.arange(256, dtype=np.uint8), spec.NUM_CHANNELS).reshape(1, 16, 16, spec.NUM_CHANNELS)
    assert np.array_equal(session.lookup(every_level), normalize(every_level))


def test_a_normaliser_graph_that_is_not_a_per_value_lookup_fails_the_load(tmp_path):
    """A graph whose floats depend on more than each value and its channel (here: minus the image's mean) cannot
    be served as a table: the load fails instead of answering differently from onnxruntime."""
    from onnx import TensorProto, helper

    fake_triton.install()
    from safety_checker_served.lookup_runner import TabulatedSession

    nodes = [
        helper.make_node("Cast", ["images"], ["values"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["values"], ["mean"], axes=[1, 2], keepdims=1),
        helper.make_node("Sub", ["values", "mean"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["pixel_values"], perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "not_a_lookup",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", *spec.IMAGES.dims])],
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", *spec.PIXEL_VALUES.dims])],
    )
    path = tmp_path / "model.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(fake_triton.TritonModelException, match="not a per-value lookup"):
        TabulatedSession(onnx_session(str(path), {}), "images", "pixel_values")


# -- safety_checker_embedder, safety_checker_embedder_int8 -------------------------------------------------
@pytest.mark.parametrize("name", EMBEDDERS)
def test_embedder_runs_the_whole_batch_through_onnxruntime_and_splits_it(repo, name):
    """fp32: one session run for the batch; int8 (activations quantised over the tensor): one run per image, so
    no image moves another's answer. As onnxruntime runs the same file; each request gets its own rows,
    non-finite pixels counted per image."""
    batches = [pixels(repo, 0, 1), pixels(repo, 1, 3), pixels(repo, 4, 2)]
    batches[1][1, 0, 5, 7] = np.nan
    batches[1][1, 2, 100] = np.inf
    batches[2][0, 1, 3, 3] = -np.inf
    responses = repo.model(name).execute([fake_triton.request({spec.PIXEL_VALUES.name: b}) for b in batches])
    session, joined = repo.session(name), np.concatenate(batches)
    runs = [joined] if name == spec.EMBEDDER_MODEL else [joined[i : i + 1] for i in range(len(joined))]
    outputs = [session.run(EMBEDDED, {spec.PIXEL_VALUES.name: run}) for run in runs]
    whole = {name: np.concatenate(column) for name, column in zip(EMBEDDED, zip(*outputs))}
    start = 0
    for batch, response in zip(batches, responses):
        got = answers(response)
        assert_same(got, rows(whole, slice(start, start + len(batch))))
        counted = (~np.isfinite(batch)).reshape(len(batch), -1).sum(axis=1, keepdims=True)
        assert np.array_equal(got[spec.NONFINITE_VALUES.name], counted)
        start += len(batch)
    assert [int(n) for n in whole[spec.NONFINITE_VALUES.name].reshape(-1)] == [0, 0, 225, 0, 1, 0]


# -- safety_checker_postprocess ----------------------------------------------------------------------------
def test_postprocess_scores_each_request_with_its_strictness(repo):
    """Scores, decisions, fired concepts, custom scores and cosines as the package computes them, each request
    with its own strictness (a preset, a number, a number as text, the config's preset) and bound."""
    rng = np.random.default_rng(7)
    sizes = [3, 2, 1, 2, 2]
    inputs = [cosines(repo, rng, n) for n in sizes]
    inputs[4][spec.COSINE_BOUND.name] = np.array([[0.004], [np.nan]])  # a nonsense bound is never sure
    parameters = [
        None,
        {"strictness": "Strong"},
        {"strictness_adjustment": 0.05},
        {"strictness_adjustment": "-0.02"},
        None,
    ]
    responses = repo.model(spec.POSTPROCESS_MODEL).execute(
        [fake_triton.request(i, p) for i, p in zip(inputs, parameters)]
    )
    strictness = [0.0, spec.STRICTNESS_PRESETS["strong"], 0.05, -0.02, 0.0]
    bounds = [np.zeros(n) for n in sizes[:4]] + [np.array([0.004, np.inf])]
    for response, expected in zip(responses, scored_batch(repo, inputs, strictness, bounds)):
        assert_scored(answers(response), expected)
    last = answers(responses[4])
    assert not last[spec.EXACT_SCORES.name].any() and not last[spec.DECISION_CERTAIN.name][1]
    everything = np.concatenate([answers(r)[spec.HAS_NSFW_CONCEPTS.name] for r in responses])
    assert everything.any() and not everything.all(), "the inputs should give both decisions"


def test_postprocess_refuses_a_bad_request_and_scores_the_others(repo):
    """A bad strictness or non-finite pixels (counted by the embedder): INVALID_ARG; non-finite cosines with
    finite pixels are the server's failure (INTERNAL). Nothing of them leaks into their batch-mates."""
    rng = np.random.default_rng(8)
    good = [cosines(repo, rng, 2), cosines(repo, rng, 1)]
    nonfinite = cosines(repo, rng, 3)
    nonfinite[spec.NONFINITE_VALUES.name][[0, 2], 0] = [5, 150528]
    nan_cosines = cosines(repo, rng, 2)
    nan_cosines[spec.SPECIAL_COSINES.name][1, 0] = np.nan
    bad = [
        (
            cosines(repo, rng, 1),
            {"strictness": "extreme"},
            "request parameter 'strictness': unknown preset 'extreme' (one of weak, medium, normal, strong, max)",
        ),
        (
            cosines(repo, rng, 1),
            {"strictness": "weak", "strictness_adjustment": 0.01},
            "request parameters 'strictness' and 'strictness_adjustment' were both given; give one",
        ),
        (
            cosines(repo, rng, 1),
            {"strictness_adjustment": 0.5},
            "request parameter 'strictness_adjustment' = 0.5 must be a number in [-0.1, 0.1]",
        ),
        (
            cosines(repo, rng, 1),
            {"strictness_adjustment": "a lot"},
            "request parameter 'strictness_adjustment' = 'a lot' must be a number in [-0.1, 0.1]",
        ),
        (
            nonfinite,
            None,
            "pixel_values holds non-finite values (NaN or Inf) (image 0: 5, image 2: 150528); "
            "nothing in this request was checked",
        ),
    ]
    batch = [fake_triton.request(good[0], {"strictness": "max"})]
    batch += [fake_triton.request(i, p) for i, p, _ in bad]
    batch += [
        fake_triton.request(nan_cosines),
        fake_triton.request(good[1], {"strictness_adjustment": -0.1}),
    ]
    responses = repo.model(spec.POSTPROCESS_MODEL).execute(batch)
    for response, (_, _, message) in zip(responses[1:], bad):
        assert refusal(response) == (INVALID_ARG, message)
    assert refusal(responses[-2]) == (
        INTERNAL,
        "the embedder returned non-finite cosines; nothing in this request was checked",
    )
    everything = [good[0], *(inputs for inputs, _, _ in bad), nan_cosines, good[1]]
    expected = scored_batch(repo, everything, [spec.STRICTNESS_PRESETS["max"], *[0.0] * len(bad), 0.0, -0.1])
    assert_scored(answers(responses[0]), expected[0])
    assert_scored(answers(responses[-1]), expected[-1])


def test_postprocess_default_strictness_is_the_configs_preset(repo):
    model = repo.load(spec.POSTPROCESS_MODEL, Settings(cascade=True, strictness="weak"))
    inputs = cosines(repo, np.random.default_rng(9), 2)
    default, chosen = model.execute(
        [fake_triton.request(inputs), fake_triton.request(inputs, {"strictness": "normal"})]
    )
    expected = scored_batch(repo, [inputs, inputs], [spec.STRICTNESS_PRESETS["weak"], 0.0])
    assert_scored(answers(default), expected[0])
    assert_scored(answers(chosen), expected[1])


def postprocess_folder(repo: Repository, root: Path, custom: Optional[bytes] = None) -> Path:
    folder = root / spec.POSTPROCESS_MODEL
    shutil.copytree(repo.root / spec.POSTPROCESS_MODEL, folder)
    if custom is not None:
        (folder / "1" / spec.CUSTOM_CONCEPTS_FILENAME).write_bytes(custom)
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ("concepts", "concepts.json holds 16 thresholds for concept_scores, the config declares 17"),
        ("custom", "custom concept set rejected: "),
        ("preset", "config parameter strictness: unknown preset 'extreme' (one of weak, medium, normal, strong, max)"),
    ],
)
def test_postprocess_refuses_to_load_what_it_cannot_serve(repo, tmp_path, change, message):
    folder = postprocess_folder(repo, tmp_path, b'{"version": 4}' if change == "custom" else None)
    if change == "concepts":
        metadata = dict(repo.metadata, concepts=repo.metadata["concepts"][1:])
        (folder / "1" / spec.CONCEPTS_FILENAME).write_text(json.dumps(metadata))
    parameters = {"strictness": "extreme"} if change == "preset" else {}
    with pytest.raises(fake_triton.TritonModelException) as refused:
        fake_triton.Server().load(spec.POSTPROCESS_MODEL, folder, python_config(spec.POSTPROCESS_MODEL), parameters)
    assert str(refused.value).startswith(message), str(refused.value)


class Clocks:
    """The concept watcher's monotonic and wall clocks, moved by the test."""

    def __init__(self, wall: float) -> None:
        self.now = 100.0
        self.wall = wall

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall


@pytest.fixture
def watched(repo, tmp_path):
    """A postprocessor of its own whose custom concept file the test rewrites, its clocks injected."""
    folder = postprocess_folder(repo, tmp_path)
    model = fake_triton.Server().load(spec.POSTPROCESS_MODEL, folder, python_config(spec.POSTPROCESS_MODEL))
    path = folder / "1" / spec.CUSTOM_CONCEPTS_FILENAME
    clocks = Clocks(wall=path.stat().st_mtime + 60)
    model.instance.custom = CustomConceptFile(
        str(path), DIMS.projection_dim, fake_triton.Logger, monotonic=clocks.monotonic, wall_clock=clocks.time
    )
    return model, path, clocks


def served_set(repo: Repository, model: fake_triton.LoadedModel, inputs, expected: concept_set.ConceptSet) -> None:
    """Both requests of one batch are answered with `expected`."""
    batch = [inputs, rows(inputs, slice(1))]
    responses = model.execute([fake_triton.request(b) for b in batch])
    for response, want in zip(responses, scored_batch(repo, batch, [0.0, 0.0], custom=expected)):
        assert_scored(answers(response), want)


def logged(level: str, start: int) -> List[str]:
    return [message for lvl, message in fake_triton.LOG[start:] if lvl == level]


def test_postprocess_serves_a_changed_concept_set_and_keeps_the_last_good_one(repo, watched):
    model, path, _ = watched
    inputs = cosines(repo, np.random.default_rng(10), 2)
    start = len(fake_triton.LOG)
    served_set(repo, model, inputs, repo.custom)

    added = repo.custom.with_concept(custom_set(np.random.default_rng(11), ["waves"], 0).concepts[0])
    concept_writer.write(path, added)
    served_set(repo, model, inputs, added)
    assert logged("INFO", start) == ["custom concept set version 4 loaded: 3 concepts (stripes, dots, waves)"]

    path.write_text('{"format_version": 1, "version": 5, ')  # a broken file: the last good set stays
    served_set(repo, model, inputs, added)
    served_set(repo, model, inputs, added)
    (error,) = logged("ERROR", start)  # logged once, however often it is looked at
    assert error.startswith("custom concept set rejected, still serving version 4: ") and "not valid JSON" in error

    concept_writer.write(path, repo.custom)  # valid, but older than what is served
    served_set(repo, model, inputs, added)
    assert "version 3 is not newer than the served version 4" in logged("ERROR", start)[-1]

    removed = added.without("stripes")
    concept_writer.write(path, removed)
    served_set(repo, model, inputs, removed)
    assert logged("INFO", start)[-1] == "custom concept set version 5 loaded: 2 concepts (dots, waves)"

    path.unlink()
    served_set(repo, model, inputs, removed)
    served_set(repo, model, inputs, removed)
    assert logged("WARNING", start) == [f"custom concept set {path} is missing; still serving version 5"]


@pytest.mark.parametrize("written_s_ago, retried", [(RECENT_WRITE_S / 4, True), (RECENT_WRITE_S * 2, False)])
def test_postprocess_looks_again_at_a_file_it_caught_half_written(repo, watched, written_s_ago, retried):
    """A file rejected moments after it was written is read again once RETRY_INTERVAL_S has passed, though its
    size and modification time did not change (a writer filling it in place); an old one is not."""
    model, path, clocks = watched
    inputs = cosines(repo, np.random.default_rng(12), 2)
    newer = repo.custom.with_threshold("dots", 0.05)
    text = concept_writer.dumps(newer).encode()
    mtime_ns = path.stat().st_mtime_ns + 10**9
    clocks.wall = mtime_ns / 1e9 + written_s_ago

    def write_in_place(data: bytes) -> None:
        with open(path, "r+b") as handle:
            handle.truncate(0)
            handle.write(data)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    start = len(fake_triton.LOG)
    write_in_place(text[: len(text) // 2] + b" " * (len(text) - len(text) // 2))
    served_set(repo, model, inputs, repo.custom)
    (error,) = logged("ERROR", start)
    assert "not valid JSON" in error
    signature = path.stat()
    write_in_place(text)
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (
        signature.st_ino,
        signature.st_size,
        signature.st_mtime_ns,
    )
    clocks.now += RETRY_INTERVAL_S * 0.8  # not read again yet
    served_set(repo, model, inputs, repo.custom)
    clocks.now += RETRY_INTERVAL_S * 0.4
    served_set(repo, model, inputs, newer if retried else repo.custom)


# -- safety_checker_cascade --------------------------------------------------------------------------------
def cascade_answers(
    repo: Repository, batches: Sequence[np.ndarray], strictness: Sequence[float], bound: float
) -> List[Dict[str, Any]]:
    """What the cascade must answer each request, from onnxruntime and the package's scoring: int8's answer
    where no cosine within `bound` of int8's changes a decision, else fp32's, scored exactly. int8 runs on every
    image alone (its activations are quantised per run), fp32 on the uncertain ones of every request in one call."""
    session, joined = repo.session(spec.INT8_EMBEDDER_MODEL), np.concatenate(batches)
    runs = [session.run(EMBEDDED, {spec.PIXEL_VALUES.name: joined[i : i + 1]}) for i in range(len(joined))]
    int8 = {name: np.concatenate(column) for name, column in zip(EMBEDDED, zip(*runs))}
    ends = np.cumsum([len(b) for b in batches])
    answers = []
    for batch, chosen, end in zip(batches, strictness, ends):
        embedded = rows(int8, slice(end - len(batch), end))
        answer = scored(repo, embedded, np.full(len(batch), chosen), np.full(len(batch), bound))
        answer[spec.IMAGE_EMBEDS.name] = embedded[spec.IMAGE_EMBEDS.name].copy()
        answers.append(answer)
    redo = [np.flatnonzero(~answer.pop(spec.DECISION_CERTAIN.name).reshape(-1)) for answer in answers]
    uncertain = np.concatenate([batch[where] for batch, where in zip(batches, redo)])
    if len(uncertain):
        fp32 = dict(zip(EMBEDDED, repo.session(spec.EMBEDDER_MODEL).run(EMBEDDED, {spec.PIXEL_VALUES.name: uncertain})))
    start = 0
    for answer, again_rows, chosen in zip(answers, redo, strictness):
        if not len(again_rows):
            continue
        exact = rows(fp32, slice(start, start + len(again_rows)))
        start += len(again_rows)
        again = scored(repo, exact, np.full(len(again_rows), chosen), np.zeros(len(again_rows)))
        del again[spec.DECISION_CERTAIN.name]
        again[spec.IMAGE_EMBEDS.name] = exact[spec.IMAGE_EMBEDS.name]
        for name, value in again.items():
            for row, i in enumerate(again_rows):
                answer[name][i] = value[row]
    return answers


def mixed_bound(repo: Repository, batches: Sequence[np.ndarray], strictness: Sequence[float]) -> float:
    """A bound under which int8 is sure of some of these images and not of others."""
    int8 = dict(
        zip(
            EMBEDDED,
            repo.session(spec.INT8_EMBEDDER_MODEL).run(EMBEDDED, {spec.PIXEL_VALUES.name: np.concatenate(batches)}),
        )
    )
    chosen = per_image(strictness, [len(b) for b in batches])
    for bound in np.geomspace(1e-4, 0.3, 80):
        sure = scored(repo, int8, chosen, np.full(len(chosen), bound))[spec.DECISION_CERTAIN.name]
        if 2 <= sure.sum() <= len(chosen) - 2:
            return float(bound)
    raise AssertionError("no bound splits these images")


def counted() -> Dict[str, float]:
    return {
        kind: fake_triton.metric_value("safety_checker_cascade_images_total", embedder=kind)
        for kind in ("int8", "fp32")
    }


@pytest.mark.parametrize("mix", ["some redone", "all redone", "none redone"])
def test_cascade_keeps_int8_answers_it_is_sure_of_and_redoes_the_rest_in_fp32(repo, mix):
    batches = [pixels(repo, 0, 3), pixels(repo, 3, 2), pixels(repo, 5, 4)]
    parameters = [None, {"strictness_adjustment": 0.0125}, {"strictness": "strong"}]
    strictness = [0.0, 0.0125, spec.STRICTNESS_PRESETS["strong"]]
    bound = mixed_bound(repo, batches, strictness) if mix == "some redone" else {"all redone": 2.0}.get(mix, 1e-12)
    cascade = repo.load(spec.CASCADE_MODEL, Settings(cascade=True, cosine_bound=bound))
    before = counted()
    responses = cascade.execute(
        [fake_triton.request({spec.PIXEL_VALUES.name: b}, p) for b, p in zip(batches, parameters)]
    )
    expected = cascade_answers(repo, batches, strictness, bound)
    for response, want in zip(responses, expected):
        assert_scored(answers(response), want)
    exact = np.concatenate([answers(r)[spec.EXACT_SCORES.name] for r in responses]).reshape(-1)
    redone = {"some redone": (2, 7), "all redone": (9, 9), "none redone": (0, 0)}[mix]
    assert redone[0] <= exact.sum() <= redone[1]
    after = counted()
    assert (after["fp32"] - before["fp32"], after["int8"] - before["int8"]) == (exact.sum(), len(exact) - exact.sum())


def test_cascade_refuses_a_bad_request_and_answers_the_others(repo):
    """What a request is at fault for is refused with INVALID_ARG (not the INTERNAL a postprocessor's refusal
    becomes on its way back through BLS, which a client would retry), before any model runs; the other
    requests are answered and counted, the refused ones are not."""
    cascade = repo.load(spec.CASCADE_MODEL, Settings(cascade=True, cosine_bound=0.01), max_request_images="4")
    batches = [pixels(repo, 0, 2), pixels(repo, 2, 1), pixels(repo, 3, 5), pixels(repo, 12, 1), pixels(repo, 13, 3)]
    parameters = [None, {"strictnes": "weak"}, None, {"strictness": "extreme"}, {"strictness_adjustment": -0.03}]
    before = counted()
    responses = cascade.execute(
        [fake_triton.request({spec.PIXEL_VALUES.name: b}, p) for b, p in zip(batches, parameters)]
    )
    code, message = refusal(responses[1])
    assert code == INVALID_ARG and message.startswith("unknown request parameter 'strictnes'; accepted: ")
    assert refusal(responses[2]) == (INVALID_ARG, "a request holds at most 4 images, this one 5")
    assert refusal(responses[3]) == (
        INVALID_ARG,
        "request parameter 'strictness': unknown preset 'extreme' (one of weak, medium, normal, strong, max)",
    )
    # The int8 embedder saw the images of the requests it answered, in their order.
    expected = cascade_answers(repo, [batches[0], batches[4]], [0.0, -0.03], 0.01)
    assert_scored(answers(responses[0]), expected[0])
    assert_scored(answers(responses[4]), expected[1])
    after = counted()
    assert after["int8"] + after["fp32"] - before["int8"] - before["fp32"] == 5


def test_cascade_refuses_non_finite_pixels(repo):
    """Counted by the int8 embedder's graph and refused with INVALID_ARG, not the INTERNAL the postprocessor's
    refusal would become through BLS. (Alone: its batch-mates are the test below.)"""
    cascade = repo.load(spec.CASCADE_MODEL, Settings(cascade=True, cosine_bound=0.01))
    nan = pixels(repo, 10, 3)
    nan[1, 0, 0, 0] = np.nan
    nan[2, 1, 7] = -np.inf
    before = counted()
    (response,) = cascade.execute([fake_triton.request({spec.PIXEL_VALUES.name: nan})])
    assert refusal(response) == (
        INVALID_ARG,
        "pixel_values holds non-finite values (NaN or Inf) (image 1: 1, image 2: 224); nothing in this request "
        "was checked",
    )
    assert counted() == before


def test_cascade_sends_pixels_no_real_image_has_to_fp32(repo):
    """int8's error bound holds for pixel_values a real image can have; an image with any value outside that range
    is answered by fp32, exactly, even when the bound says int8 is sure."""
    cascade = repo.load(spec.CASCADE_MODEL, Settings(cascade=True, cosine_bound=1e-12))
    batch = pixels(repo, 0, 3)
    batch[1] *= 1e4
    (response,) = cascade.execute([fake_triton.request({spec.PIXEL_VALUES.name: batch})])
    got = answers(response)
    assert got[spec.EXACT_SCORES.name].reshape(-1).tolist() == [False, True, False]
    fp32 = dict(zip(EMBEDDED, repo.session(spec.EMBEDDER_MODEL).run(EMBEDDED, {spec.PIXEL_VALUES.name: batch[1:2]})))
    want = scored(repo, fp32, np.zeros(1), np.zeros(1))
    assert np.array_equal(got[spec.CONCEPT_SCORES.name][1:2], want[spec.CONCEPT_SCORES.name])
    assert np.array_equal(got[spec.IMAGE_EMBEDS.name][1:2], fp32[spec.IMAGE_EMBEDS.name])


def cascade_and_fp32(repo: Repository, batch_mate: Optional[np.ndarray] = None):
    """The cascade's response to 24 ordinary images (their request alone, or batched with another one holding
    `batch_mate`), with the int8 error bound the export measures, and the fp32 checker's answers to them."""
    cascade = repo.load(spec.CASCADE_MODEL, Settings(cascade=True, cosine_bound=repo.int8_bound))
    good = pixels(repo, 0, 24)
    batch = [good] if batch_mate is None else [good, batch_mate]
    response = cascade.execute([fake_triton.request({spec.PIXEL_VALUES.name: b}) for b in batch])[0]
    (embedded,) = repo.model(spec.EMBEDDER_MODEL).execute([fake_triton.request({spec.PIXEL_VALUES.name: good})])
    inputs = {name: answers(embedded)[name] for name in SCORED}
    (fp32,) = repo.model(spec.POSTPROCESS_MODEL).execute([fake_triton.request(inputs)])
    return response, answers(fp32)


def broken_promises(got: Dict[str, np.ndarray], fp32: Dict[str, np.ndarray], bound: float) -> List[str]:
    """Where the cascade breaks its promise: fp32's decision for every image, and for an int8 answer scores
    within the bound of fp32's (and of their rounding to 0.001)."""
    broken = []
    for i, (flag, want) in enumerate(zip(got[spec.HAS_NSFW_CONCEPTS.name], fp32[spec.HAS_NSFW_CONCEPTS.name])):
        if flag != want:
            broken.append(f"image {i}: flagged {bool(flag[0])}, fp32 says {bool(want[0])}")
        if not got[spec.EXACT_SCORES.name][i, 0]:
            deviation = max(
                float(np.max(np.abs(got[name][i] - fp32[name][i])))
                for name in (spec.CONCEPT_SCORES.name, spec.SPECIAL_SCORES.name)
            )
            if deviation > bound + 0.001:
                broken.append(f"image {i}: int8 scores {deviation:.3f} from fp32's, bound {bound:.4f}")
    return broken


def test_cascade_keeps_its_promise_for_a_batch_of_ordinary_images(repo):
    response, fp32 = cascade_and_fp32(repo)
    got = answers(response)
    assert broken_promises(got, fp32, repo.int8_bound) == []
    assert not got[spec.EXACT_SCORES.name].all(), "some int8 answers should be kept"


def test_cascade_answers_do_not_depend_on_the_other_requests_of_the_batch(repo):
    response, fp32 = cascade_and_fp32(repo, pixels(repo, 30, 1) * 1e4)
    assert broken_promises(answers(response), fp32, repo.int8_bound) == []


def test_cascade_answers_the_batch_mates_of_a_request_with_infinite_pixels(repo):
    infinite = pixels(repo, 30, 1)
    infinite[0, 0, 0, 0] = np.inf
    response, fp32 = cascade_and_fp32(repo, infinite)
    assert broken_promises(answers(response), fp32, repo.int8_bound) == []


# -- safety_checker_views ----------------------------------------------------------------------------------
def test_views_answer_each_file_by_its_first_flagged_view(repo):
    """Every answer of a file's chosen view, copied; a file with a flagged view is flagged by the first of them,
    one without by its first view; `view` says which."""
    files = [
        [(0, False, False), (1, False, True), (2, False, True)],  # an animation whose second frame is flagged
        [(0, False, False), (0, True, True)],  # content under transparency: flagged once its alpha is dropped
        [(0, False, False)],  # a still, opaque picture
        [(0, False, True), (0, True, False), (1, False, False)],  # flagged as shown, in its first frame
    ]
    inputs = per_view_answers(np.random.default_rng(7), files)
    (response,) = repo.model(spec.VIEWS_MODEL).execute([fake_triton.request(inputs)])
    got = answers(response)
    rows = [1, 4, 5, 6]
    for tensor, per_view in zip(spec.ENSEMBLE_OUTPUTS, spec.PER_VIEW_OUTPUTS):
        assert np.array_equal(got[tensor.name], inputs[per_view.name][rows]), tensor.name
    assert got[spec.HAS_NSFW_CONCEPTS.name].reshape(-1).tolist() == [True, True, False, True]
    assert [json.loads(v) for v in got[spec.VIEW.name].reshape(-1)] == [
        {"frame": 1, "frames": 3, "transparency": None, "views": 3},
        {"frame": 0, "frames": 1, "transparency": "dropped", "views": 2},
        {"frame": 0, "frames": 1, "transparency": None, "views": 1},
        {"frame": 0, "frames": 2, "transparency": "composited", "views": 3},
    ]


# -- issue 18: a concept file never takes the server down (finding 8); one failing request alone ------------------
REJECTED = "safety_checker_concept_set_rejected_total"
NESTED = b"[" * 100000 + b"]" * 100000  # deeper than json's parser (and a message's repr) can go


def test_finding_8_a_concept_file_that_breaks_the_parser_keeps_the_last_good_set_and_is_counted(
    repo, tmp_path, monkeypatch
):
    """Any error while reading the custom concept file (RecursionError, UnicodeDecodeError, MemoryError, a version
    past 2**53 - 1) keeps the set served: every answer still uses it, the log says why (no traceback), and the
    postprocessor's counter counts each file once, however often it is looked at."""
    folder = postprocess_folder(repo, tmp_path)
    model = fake_triton.Server().load(spec.POSTPROCESS_MODEL, folder, python_config(spec.POSTPROCESS_MODEL))
    path = folder / "1" / spec.CUSTOM_CONCEPTS_FILENAME
    inputs = cosines(repo, np.random.default_rng(18), 2)
    served_set(repo, model, inputs, repo.custom)
    before, start = fake_triton.metric_value(REJECTED), len(fake_triton.LOG)
    newest = json.loads(concept_writer.dumps(repo.custom))
    for count, bad in enumerate(
        [
            NESTED,
            b"\xff\xfe" + concept_writer.dumps(repo.custom).encode(),
            json.dumps(dict(newest, version=2**63)).encode(),
            json.dumps(dict(newest, version=2**53)).encode(),
        ],
        1,
    ):
        path.write_bytes(bad)
        served_set(repo, model, inputs, repo.custom)
        served_set(repo, model, inputs, repo.custom)
        assert fake_triton.metric_value(REJECTED) - before == count
    errors = logged("ERROR", start)
    assert len(errors) == 4
    assert all(e.startswith("custom concept set rejected, still serving version 3: ") for e in errors)
    assert "nested too deeply" in errors[0] and "not UTF-8" in errors[1] and "2**53 - 1" in errors[2]
    assert not any("Traceback" in e or "RecursionError" in e for e in errors)

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    concept_writer.write(path, repo.custom.with_threshold("dots", 0.2))
    with monkeypatch.context() as patched:  # whatever the parser raises, not only what it is known to
        patched.setattr(concept_set, "parse", out_of_memory)
        served_set(repo, model, inputs, repo.custom)
    assert fake_triton.metric_value(REJECTED) - before == 5 and "MemoryError" in logged("ERROR", start)[-1]

    exact = dict(newest, version=2**53 - 1)  # the largest version there is: served, and answered exactly
    path.write_text(json.dumps(exact))
    largest = concept_set.parse(json.dumps(exact), DIMS.projection_dim)
    served_set(repo, model, inputs, largest)
    (response,) = model.execute([fake_triton.request(inputs)])
    assert answers(response)[spec.CONCEPT_SET_VERSION.name].reshape(-1).tolist() == [2**53 - 1] * 2
    assert fake_triton.metric_value(REJECTED) - before == 5


@pytest.mark.parametrize("custom", [NESTED, b"\xff\xfe{}"], ids=["nested", "not-utf8"])
def test_finding_8_at_load_a_file_with_no_valid_set_stops_the_model_with_a_clear_message(repo, tmp_path, custom):
    """Fail closed: with nothing safe to serve the postprocessor does not load, and says why in one line."""
    folder = postprocess_folder(repo, tmp_path, custom)
    with pytest.raises(fake_triton.TritonModelException) as refused:
        fake_triton.Server().load(spec.POSTPROCESS_MODEL, folder, python_config(spec.POSTPROCESS_MODEL))
    message = str(refused.value)
    assert message.startswith("custom concept set rejected: ") and "\n" not in message
    assert ("nested too deeply" if custom == NESTED else "not UTF-8") in message
    assert "Traceback" not in message and "RecursionError" not in message and len(message) < 2000


SENTINEL = 0.0625  # a value the test puts into one request: the patched step raises on it


def unexpected(where: str):
    """What an unexpected error must never show: its type, a path, a traceback, the values."""
    return RuntimeError(f"Traceback: boom in /opt/tritonserver/models/{where}/model.py at 0x7f00")


def assert_failed_alone(response: fake_triton.InferenceResponse, start: int) -> None:
    code, message = refusal(response)
    assert code == fake_triton.TritonError.INTERNAL
    for leak in ("Traceback", "/", "RuntimeError", "boom", "0x7f00"):
        assert leak not in message, message
    (logged_error,) = [m for m in logged("ERROR", start) if "unexpectedly" in m]
    assert "RuntimeError" in logged_error and "boom" not in logged_error and "/" not in logged_error


def test_postprocess_fails_only_the_request_an_unexpected_error_comes_from(repo, monkeypatch):
    model = repo.load(spec.POSTPROCESS_MODEL)
    scorer = type(model.instance)._scored.__globals__
    real = scorer["score_all"]

    def score_all(concept_cos, *rest):
        if np.any(concept_cos == SENTINEL):
            raise unexpected("safety_checker_postprocess")
        return real(concept_cos, *rest)

    monkeypatch.setitem(scorer, "score_all", score_all)
    batch = [cosines(repo, np.random.default_rng(seed), n) for seed, n in ((20, 2), (21, 1), (22, 3))]
    batch[1][spec.CONCEPT_COSINES.name][0, 4] = SENTINEL
    start = len(fake_triton.LOG)
    responses = model.execute([fake_triton.request(inputs) for inputs in batch])
    assert_failed_alone(responses[1], start)
    for index in (0, 2):  # answered as if alone
        (want,) = scored_batch(repo, [batch[index]], [0.0])
        assert_scored(answers(responses[index]), want)


def test_the_onnx_runner_fails_only_the_request_an_unexpected_error_comes_from(repo, monkeypatch):
    embedder = repo.load(spec.EMBEDDER_MODEL)
    run = embedder.instance._run

    def failing_run(batch):
        if np.any(batch == SENTINEL):
            raise unexpected("safety_checker_embedder")
        return run(batch)

    monkeypatch.setattr(embedder.instance, "_run", failing_run)
    batches = [pixels(repo, 0, 2), pixels(repo, 2, 1), pixels(repo, 3, 2)]
    batches[1][0, 1, 2, 3] = SENTINEL
    start = len(fake_triton.LOG)
    responses = embedder.execute([fake_triton.request({spec.PIXEL_VALUES.name: b}) for b in batches])
    assert_failed_alone(responses[1], start)
    session = repo.session(spec.EMBEDDER_MODEL)
    for index in (0, 2):
        want = dict(zip(EMBEDDED, session.run(EMBEDDED, {spec.PIXEL_VALUES.name: batches[index]})))
        assert_same(answers(responses[index]), want)


def test_the_cascade_fails_only_the_request_an_unexpected_error_comes_from(repo, monkeypatch):
    bound = 0.01
    cascade = repo.load(spec.CASCADE_MODEL, Settings(cascade=True, cosine_bound=bound))
    embed = cascade.instance._embed

    def failing_embed(model, batch):
        if np.any(batch == SENTINEL):
            raise unexpected("safety_checker_cascade")
        return embed(model, batch)

    monkeypatch.setattr(cascade.instance, "_embed", failing_embed)
    batches = [pixels(repo, 0, 2), pixels(repo, 2, 1), pixels(repo, 3, 3)]
    batches[1][0, 0, 0, 0] = SENTINEL
    before, start = counted(), len(fake_triton.LOG)
    responses = cascade.execute([fake_triton.request({spec.PIXEL_VALUES.name: b}) for b in batches])
    assert_failed_alone(responses[1], start)
    for index in (0, 2):
        (want,) = cascade_answers(repo, [batches[index]], [0.0], bound)
        assert_scored(answers(responses[index]), want)
    after = counted()
    assert after["int8"] + after["fp32"] - before["int8"] - before["fp32"] == 5  # the answered images, once each
