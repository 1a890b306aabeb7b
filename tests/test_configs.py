"""Every config.pbtxt, rendered from the model descriptions: valid for Triton, committed, and as promised."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT

from export import configs
from safety_checker_client import spec


def test_every_config_is_a_valid_triton_model_config():
    """Parsed with Triton's own ModelConfig schema, so a misspelt key fails here, not on a GPU."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for relative, text in configs.render_all(spec.REFERENCE_DIMS).items():
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.max_batch_size == spec.MAX_BATCH_SIZE, relative


def _parsed(relative: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(configs.render_all(spec.REFERENCE_DIMS)[relative], model_config_pb2.ModelConfig())


def test_fast_gpu_engine_profile_covers_every_batch_the_server_accepts():
    config = _parsed(configs.EMBEDDER_FAST_GPU_CONFIG)
    (tensorrt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert tensorrt.name == "tensorrt"
    assert tensorrt.parameters["precision_mode"] == "FP16"
    # It pins a decomposed LayerNorm's Pow -> ReduceMean in fp32, which is how the export writes every LayerNorm
    # (tests/test_graph_ops.py).
    assert tensorrt.parameters["trt_layer_norm_fp32_fallback"] == "1"
    assert tensorrt.parameters["trt_profile_min_shapes"] == "pixel_values:1x3x224x224"
    assert tensorrt.parameters["trt_profile_max_shapes"] == f"pixel_values:{spec.MAX_BATCH_SIZE}x3x224x224"
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert [g.count for g in config.instance_group] == [2]
    (warmup,) = config.model_warmup
    assert warmup.batch_size == spec.MAX_BATCH_SIZE and set(warmup.inputs) == {spec.PIXEL_VALUES.name}


def test_default_gpu_config_is_exact_fp32_without_tf32():
    config = _parsed(configs.EMBEDDER_EXACT_GPU_CONFIG)
    assert config.backend == "onnxruntime"
    (cuda,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert cuda.name == "cuda" and dict(cuda.parameters) == {"use_tf32": "0"}
    assert [g.count for g in config.instance_group] == [2]


def test_committed_configs_are_the_rendered_reference_configs():
    for relative, text in configs.render_committed().items():
        assert (ROOT / "model_repository" / relative).read_text() == text, relative
