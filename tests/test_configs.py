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


def test_image_files_are_decoded_on_cpu_instances_in_every_configuration():
    from export.image_models import REFERENCE_DECODER_INSTANCES
    from export.models import Settings

    for decoders in (REFERENCE_DECODER_INSTANCES, 3):
        rendered = configs.render_all(spec.REFERENCE_DIMS, Settings(decoder_instances=decoders))
        # One config for every host: decoding is CPU work, and the decoder waits for nothing else.
        assert not [path for path in rendered if path.parts[0] == spec.DECODE_MODEL and path.name != "config.pbtxt"]
        config = _parse(rendered[Path(spec.DECODE_MODEL, "config.pbtxt")])
        assert config.backend == "python" and config.max_batch_size == spec.MAX_BATCH_SIZE
        assert [i.name for i in config.input] == [spec.IMAGE.name] and config.input[0].dims == [1]
        assert [(o.name, list(o.dims)) for o in config.output] == [
            (spec.IMAGES.name, list(spec.IMAGES.dims)),
            (spec.VIEWS.name, [3]),
        ]
        assert [g.kind for g in config.instance_group] == [config.instance_group[0].KIND_CPU]
        assert [g.count for g in config.instance_group] == [decoders]
        assert config.parameters["max_encoded_bytes"].string_value == str(20 * 1024 * 1024)
        assert config.parameters["max_pixels"].string_value == str(spec.MAX_IMAGE_PIXELS)
        assert config.parameters["max_aspect_ratio"].string_value == str(spec.MAX_ASPECT_RATIO)
        assert config.parameters["max_frames"].string_value == str(spec.MAX_FRAMES)
        assert config.parameters["max_views"].string_value == str(spec.MAX_BATCH_SIZE)
        # The images model is an ensemble: the decoder, the uint8 path on every view, one answer per file.
        images = _parse(rendered[Path(spec.IMAGES_MODEL, "config.pbtxt")])
        assert images.platform == "ensemble"
        assert [step.model_name for step in images.ensemble_scheduling.step] == [
            spec.DECODE_MODEL,
            spec.NORMALIZE_MODEL,
            spec.EMBEDDER_MODEL,
            spec.POSTPROCESS_MODEL,
            spec.VIEWS_MODEL,
        ]
        # Every view's answer goes to the views step under its per-view name.
        (postprocess,) = [s for s in images.ensemble_scheduling.step if s.model_name == spec.POSTPROCESS_MODEL]
        assert dict(postprocess.output_map)[spec.HAS_NSFW_CONCEPTS.name] == f"per_view_{spec.HAS_NSFW_CONCEPTS.name}"
    # The pixel ensemble's outputs, in the same order, and then `view`.
    pixel = _parsed(Path(spec.ENSEMBLE_MODEL, "config.pbtxt"))
    assert [(o.name, o.data_type, list(o.dims)) for o in pixel.output] + [(spec.VIEW.name, 13, [1])] == [
        (o.name, o.data_type, list(o.dims)) for o in _parsed(Path(spec.IMAGES_MODEL, "config.pbtxt")).output
    ]


def _parse(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())
