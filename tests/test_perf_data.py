"""perf_analyzer's `--input-data` files (bench/perf_analyzer/*.json): current, served-model-shaped, same answers.

The files are committed so that perf_analyzer in NVIDIA's SDK container needs
nothing from this repository's Python environment. These tests keep them
honest: they must be what `python -m bench.perf_data` writes now (so they follow
the client's preprocessing), fit the inputs the running server reports, and
make the server give, for both ensembles, the answers the client gets for the
same photographs.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import triton_to_np_dtype

from bench import perf_data
from safety_checker_client import spec
from safety_checker_client.client import SafetyCheckerClient
from safety_checker_client.preprocess import preprocess, preprocess_uint8

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "bench" / "perf_analyzer"
FILES = sorted(COMMITTED.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="ascii"))


def test_one_file_per_ensemble():
    assert [p.name for p in FILES] == sorted(
        perf_data.filename(m) for m in (spec.ENSEMBLE_MODEL, spec.UINT8_ENSEMBLE_MODEL)
    )


def test_committed_files_are_what_the_generator_writes_now(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.perf_data", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [p.name for p in FILES]
    for committed in FILES:
        assert load(tmp_path / committed.name) == load(committed), (
            f"{committed.relative_to(ROOT)} is stale: run `python -m bench.perf_data` and commit the result"
        )


def test_format_is_perf_analyzers_real_input_data():
    """Only a "data" list of batch-1 entries; each tensor a {"b64": ...} object without "shape"."""
    for path in FILES:
        document = load(path)
        assert list(document) == ["data"], path.name  # perf_analyzer rejects other top-level members
        entries = document["data"]
        assert len(entries) == len(perf_data.PHOTOS), path.name
        for entry in entries:
            for content in entry.values():
                assert list(content) == ["b64"]
                assert isinstance(content["b64"], str)


def test_entries_decode_to_the_clients_preprocessing_little_endian():
    """Byte order and layout pinned independently of the generator: '<f4' / 'u1', C order."""
    images = perf_data.photos()
    expected = {
        spec.ENSEMBLE_MODEL: (spec.PIXEL_VALUES, preprocess(images).astype("<f4")),
        spec.UINT8_ENSEMBLE_MODEL: (spec.IMAGES, preprocess_uint8(images)),
    }
    for model, (tensor, batch) in expected.items():
        entries = load(COMMITTED / perf_data.filename(model))["data"]
        got = [base64.b64decode(e[tensor.name]["b64"]) for e in entries]
        assert got == [image.tobytes(order="C") for image in batch], model
    # perf_data.decode inverts the encoding and refuses a byte size that does not fit the dims.
    tensor = spec.PIXEL_VALUES
    last = load(COMMITTED / perf_data.filename(spec.ENSEMBLE_MODEL))["data"][-1][tensor.name]
    assert np.array_equal(perf_data.decode(last, tensor.datatype, tensor.dims), preprocess(images[-1:])[0])
    with pytest.raises(ValueError, match="bytes do not make"):
        perf_data.decode(last, spec.IMAGES.datatype, spec.IMAGES.dims)


def test_each_image_can_be_written_several_times_in_a_row():
    """At concurrency c perf_analyzer sends every c-th entry only: the cascade rows write each image c times."""
    images = perf_data.photos()[:3]
    once = perf_data.input_data(spec.UINT8_ENSEMBLE_MODEL, images)["data"]
    thrice = perf_data.input_data(spec.UINT8_ENSEMBLE_MODEL, images, repeat=3)["data"]
    assert thrice == [entry for entry in once for _ in range(3)]


# -- against the running tritonserver ------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def served_inputs(triton, model: str) -> Dict[str, tuple]:
    """name -> (datatype, per-request dims without the batch dim), from the server's metadata and config."""
    metadata = triton.get_model_metadata(model)
    config = triton.get_model_config(model).config
    assert config.max_batch_size > 0, f"{model} does not batch; perf_analyzer's -b needs a batching model"
    configured = {i.name: (i.data_type, tuple(i.dims)) for i in config.input}
    served = {}
    for tensor in metadata.inputs:
        assert tensor.shape[0] == -1  # the batch dimension
        dims = tuple(tensor.shape[1:])
        data_type, config_dims = configured[tensor.name]
        assert config_dims == dims
        assert model_config_pb2.DataType.Name(data_type) == f"TYPE_{tensor.datatype}"
        served[tensor.name] = (tensor.datatype, dims)
    return served


def decoded_batch(triton, path: Path) -> Dict[str, np.ndarray]:
    """Every entry decoded with the served datatype and dims, stacked into one batch per input."""
    model = path.stem
    inputs = served_inputs(triton, model)
    entries = load(path)["data"]
    batches = {}
    for name, (datatype, dims) in inputs.items():
        dtype = np.dtype(triton_to_np_dtype(datatype)).newbyteorder("<")
        tensors = []
        for index, entry in enumerate(entries):
            assert set(entry) == set(inputs), f"{path.name} entry {index}: {sorted(entry)} vs served {sorted(inputs)}"
            raw = base64.b64decode(entry[name]["b64"], validate=True)
            assert len(raw) == int(np.prod(dims)) * dtype.itemsize, f"{path.name} entry {index}: {len(raw)} bytes"
            tensors.append(np.frombuffer(raw, dtype=dtype).reshape(dims))
        batches[name] = np.stack(tensors)
    return batches


def test_files_fit_the_served_models(triton):
    for path in FILES:
        assert triton.is_model_ready(path.stem), f"{path.name} names no served model"
        batches = decoded_batch(triton, path)
        for name, batch in batches.items():
            assert batch.shape[0] == len(perf_data.PHOTOS)
            # Distinct photographs, not one image repeated.
            assert len({batch[i].tobytes() for i in range(len(batch))}) == len(batch), name


def infer(triton, model: str, batches: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    metadata = triton.get_model_metadata(model)
    inputs = []
    for tensor in metadata.inputs:
        value = np.ascontiguousarray(batches[tensor.name])
        infer_input = grpcclient.InferInput(tensor.name, list(value.shape), tensor.datatype)
        infer_input.set_data_from_numpy(value)
        inputs.append(infer_input)
    outputs = [grpcclient.InferRequestedOutput(t.name) for t in metadata.outputs]
    result = triton.infer(model, inputs, outputs=outputs)
    return {t.name: result.as_numpy(t.name) for t in metadata.outputs}


def test_both_files_give_the_clients_answers(server, triton):
    answers = {path.stem: infer(triton, path.stem, decoded_batch(triton, path)) for path in FILES}
    as_float, as_uint8 = answers[spec.ENSEMBLE_MODEL], answers[spec.UINT8_ENSEMBLE_MODEL]
    assert set(as_float) == set(as_uint8) == {t.name for t in spec.ENSEMBLE_OUTPUTS}
    for name in (spec.HAS_NSFW_CONCEPTS.name, spec.CONCEPT_SCORES.name, spec.SPECIAL_SCORES.name):
        assert np.array_equal(as_float[name], as_uint8[name]), name
    np.testing.assert_allclose(as_float[spec.IMAGE_EMBEDS.name], as_uint8[spec.IMAGE_EMBEDS.name], atol=1e-6, rtol=0)

    with SafetyCheckerClient(server.grpc_url) as checker:
        results = checker.check(perf_data.photos())
    assert len(results) == len(perf_data.PHOTOS)
    for answer in (as_float, as_uint8):
        assert [r.flagged for r in results] == answer[spec.HAS_NSFW_CONCEPTS.name].reshape(len(results)).tolist()
        assert [r.concept_scores for r in results] == [
            [round(float(s), 3) for s in row] for row in answer[spec.CONCEPT_SCORES.name]
        ]
        assert [r.special_scores for r in results] == [
            [round(float(s), 3) for s in row] for row in answer[spec.SPECIAL_SCORES.name]
        ]
        np.testing.assert_allclose(
            np.stack([r.image_embeds for r in results]), answer[spec.IMAGE_EMBEDS.name], atol=1e-6, rtol=0
        )
