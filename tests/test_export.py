"""`python -m export`: what it writes, and what it refuses (leaving the destination untouched)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import exported, run_export

from export import configs
from export.cli import main
from export.environment import default_targets
from export.graph import EmbedderGraph
from export.image_models import host_decoder_instances
from export.models import Settings
from export.onnx_export import VerificationError, export_onnx, verify_onnx
from export.parameters import ENVIRONMENT_FILENAME
from export.repository import MODEL_FOLDERS
from fixtures.checkers import build_checker, save_checker
from safety_checker_client import spec
from safety_checker_client.spec import ModelDims
from safety_checker_served import concept_set, concept_writer

# Every test here runs the export (seconds each, in a subprocess as a user runs it).
pytestmark = pytest.mark.slow


def test_writes_a_complete_repository(repository, reference_checker):
    onnx_file = repository / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME
    model = onnx.load(str(onnx_file))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == [t.name for t in spec.EMBEDDER_INPUTS]
    assert [o.name for o in model.graph.output] == [t.name for t in spec.EMBEDDER_OUTPUTS]
    pixel = inputs[spec.PIXEL_VALUES.name].type.tensor_type
    assert pixel.elem_type == onnx.TensorProto.FLOAT
    assert pixel.shape.dim[0].dim_param  # dynamic batch axis
    assert [d.dim_value for d in pixel.shape.dim[1:]] == list(spec.PIXEL_VALUES.dims)

    dims = ModelDims(17, 3, reference_checker.config.projection_dim)
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()[:16]
    settings = Settings(engine_cache_key=digest, decoder_instances=host_decoder_instances())
    for relative, text in configs.render_all(dims, settings).items():
        assert (repository / relative).read_text() == text
    metadata = json.loads((repository / spec.POSTPROCESS_MODEL / "1" / spec.CONCEPTS_FILENAME).read_text())
    assert [c["threshold"] for c in metadata["concepts"]] == reference_checker.concept_embeds_weights.tolist()
    assert [c["threshold"] for c in metadata["special_care"]] == reference_checker.special_care_embeds_weights.tolist()
    for folder in (spec.EMBEDDER_MODEL, spec.NORMALIZE_MODEL, spec.POSTPROCESS_MODEL):
        model_py = repository / folder / "1" / "model.py"
        assert model_py.is_file() and not model_py.is_symlink()
    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == sorted(MODEL_FOLDERS)
    assert (repository / "health_probe.py").is_file()  # the deployments' health check, beside the models
    custom = concept_set.read(repository / spec.POSTPROCESS_MODEL / "1" / spec.CUSTOM_CONCEPTS_FILENAME)
    assert (custom.version, custom.embedding_dim, custom.concepts) == (0, dims.projection_dim, ())
    # The postprocessor reads custom_concepts.json with the very module the CLI writes it with: its environment
    # holds the served package, for every Python it is built for.
    with tarfile.open(repository / spec.POSTPROCESS_MODEL / ENVIRONMENT_FILENAME) as environment:
        modules = [m for m in environment.getmembers() if m.name.endswith("safety_checker_served/concept_set.py")]
        assert len(modules) == len(default_targets())
        for member in modules:
            assert environment.extractfile(member).read() == Path(concept_set.__file__).read_bytes()


def test_engine_cache_prefix_follows_the_exported_onnx(repository, tmp_path):
    """onnxruntime's TensorRT cache key ignores the weights: each export gets a prefix of its own."""

    def prefix(repo: Path) -> str:
        config = (repo / configs.EMBEDDER_FAST_GPU_CONFIG).read_text()
        digest = hashlib.sha256((repo / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME).read_bytes()).hexdigest()
        assert f'key: "trt_engine_cache_prefix" value: "checker_{digest[:16]}"' in config
        return digest[:16]

    other = exported(save_checker(tmp_path / "other", build_checker(seed=11)), tmp_path / "other-repository")
    assert prefix(repository) != prefix(other)


@pytest.fixture(scope="module")
def existing_repository(tmp_path_factory) -> Path:
    """A destination that already holds a repository; refusals must leave it byte for byte."""
    target = tmp_path_factory.mktemp("existing")
    (target / "marker.txt").write_text("untouched")
    return target


def export_here(model: Path | str, repository: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m export`'s main() in this process (its refusals come before any ONNX is written, and importing
    torch once saves seconds a test); stdout and stderr captured as `run_export` captures them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--model", str(model), "--repository", str(repository), *extra])
    return subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


def assert_refused(result, *fragments, destination: Path):
    assert result.returncode == 1, result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in destination.iterdir()) == ["marker.txt"]


def test_missing_path(existing_repository, tmp_path):
    result = export_here(tmp_path / "nowhere", existing_repository)
    assert_refused(result, "does not exist", destination=existing_repository)


def test_directory_that_is_not_a_safety_checker(existing_repository, tmp_path):
    from transformers import CLIPVisionModel

    from fixtures.checkers import clip_config

    CLIPVisionModel(clip_config().vision_config).save_pretrained(str(tmp_path / "vision"))
    result = export_here(tmp_path / "vision", existing_repository)
    assert_refused(result, "not a StableDiffusionSafetyChecker", destination=existing_repository)
    (tmp_path / "empty").mkdir()
    result = export_here(tmp_path / "empty", existing_repository)
    assert_refused(result, "no config.json", destination=existing_repository)


def test_corrupted_weights(existing_repository, tmp_path):
    checker_dir = save_checker(tmp_path / "corrupt")
    weights = checker_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = export_here(checker_dir, existing_repository)
    assert_refused(result, "cannot load the safety checker", destination=existing_repository)


def test_weights_that_do_not_match_the_config(existing_repository, tmp_path):
    checker_dir = save_checker(tmp_path / "mismatch")
    config = json.loads((checker_dir / "config.json").read_text())
    config["projection_dim"] = 24  # the saved projection is 32 -> 16
    (checker_dir / "config.json").write_text(json.dumps(config))
    result = export_here(checker_dir, existing_repository)
    assert result.returncode == 1
    assert "cannot load the safety checker" in result.stderr or "do not match" in result.stderr, result.stderr
    assert_refused(result, destination=existing_repository)


def test_missing_weights_are_not_filled_with_random_values(existing_repository, tmp_path):
    from safetensors.torch import load_file, save_file

    checker_dir = save_checker(tmp_path / "partial")
    weights = load_file(str(checker_dir / "model.safetensors"))
    del weights["concept_embeds"]
    save_file(weights, str(checker_dir / "model.safetensors"), metadata={"format": "pt"})
    result = export_here(checker_dir, existing_repository)
    assert_refused(result, "concept_embeds", destination=existing_repository)


def test_preprocessing_that_the_client_does_not_do(existing_repository, tmp_path):
    checker_dir = save_checker(tmp_path / "other-preprocessing")
    config = json.loads((checker_dir / "preprocessor_config.json").read_text())
    config["image_mean"] = [0.5, 0.5, 0.5]
    (checker_dir / "preprocessor_config.json").write_text(json.dumps(config))
    result = export_here(checker_dir, existing_repository)
    assert_refused(result, "image_mean", destination=existing_repository)


def test_unreachable_hub(existing_repository):
    env = {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = run_export("CompVis/stable-diffusion-safety-checker", existing_repository)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert_refused(result, "hub", destination=existing_repository)


def test_low_opset_is_refused(existing_repository, tmp_path):
    result = export_here(tmp_path / "unused", existing_repository, "--opset", "13")
    assert result.returncode == 2 and "17" in result.stderr


def test_decoder_instances_are_chosen_or_refused(existing_repository, tmp_path):
    result = export_here(tmp_path / "unused", existing_repository, "--decoder-instances", "0")
    assert result.returncode == 2 and "--decoder-instances 0 is below 1" in result.stderr
    target = exported_with(tmp_path, "--decoder-instances", "3")
    assert "kind: KIND_CPU\n    count: 3\n" in (target / spec.DECODE_MODEL / "config.pbtxt").read_text()


def exported_with(tmp_path, *extra: str) -> Path:
    checker_dir = save_checker(tmp_path / "checker", build_checker(seed=5))
    result = run_export(checker_dir, tmp_path / "repo", *extra)
    assert result.returncode == 0, result.stderr
    return tmp_path / "repo"


def test_verification_catches_a_graph_that_differs(tmp_path):
    """An ONNX file whose weights drifted from the PyTorch model is rejected with the measured diff."""
    checker = build_checker(seed=3)
    onnx_file = tmp_path / "model.onnx"
    export_onnx(EmbedderGraph(checker), onnx_file)
    assert verify_onnx(checker, onnx_file) <= 1e-5

    model = onnx.load(str(onnx_file))
    largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(largest).copy()
    values *= 1.01
    largest.CopyFrom(onnx.numpy_helper.from_array(values, largest.name))
    onnx.save(model, str(onnx_file))
    with pytest.raises(VerificationError, match=r"differ from PyTorch by [0-9.e-]+ \(max abs\)"):
        verify_onnx(checker, onnx_file)


def test_a_tolerance_that_cannot_be_met_fails_the_export(existing_repository, tmp_path):
    checker_dir = save_checker(tmp_path / "strict", build_checker(seed=4))
    result = export_here(checker_dir, existing_repository, "--tolerance", "0")
    if result.returncode == 0:  # bit-identical cosines: then the export wrote a repository
        pytest.fail("onnxruntime matched PyTorch bit for bit; pick a seed whose cosines differ")
    assert_refused(result, "above the tolerance 0", destination=existing_repository)


def test_export_is_repeatable_into_the_same_place(tmp_path):
    checker_dir = save_checker(tmp_path / "checker")
    target = tmp_path / "repo"
    (target / "other_model").mkdir(parents=True)  # someone else's model stays
    custom_file = target / spec.POSTPROCESS_MODEL / "1" / spec.CUSTOM_CONCEPTS_FILENAME
    for attempt in range(2):
        result = export_here(checker_dir, target)
        assert result.returncode == 0, result.stderr
        if attempt == 0:  # the operator adds a concept between the two exports
            rng = np.random.default_rng(0)
            concept = concept_set.make_concept(
                "logo", rng.standard_normal(16), 0.3, {"kind": "images", "sha256": ["ab" * 32]}, category="brand"
            )
            concept_writer.write(custom_file, concept_set.read(custom_file).with_concept(concept))
            kept = custom_file.read_bytes()
    assert custom_file.read_bytes() == kept  # re-exporting never loses the operator's concepts
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == sorted([*MODEL_FOLDERS, "other_model"])

    # A set the re-exported checker could not serve stops the export before anything changes.
    onnx_file = target / spec.EMBEDDER_MODEL / "1" / spec.ONNX_FILENAME
    onnx_bytes = onnx_file.read_bytes()
    custom_file.write_text(kept.decode().replace('"version": 1', '"version": 1,,'))
    result = export_here(checker_dir, target)
    assert result.returncode == 1
    assert "custom concept set cannot be kept" in result.stderr and "is not valid JSON: line 3" in result.stderr
    assert "Traceback" not in result.stderr
    assert onnx_file.read_bytes() == onnx_bytes and ",," in custom_file.read_text()
