"""Render every config.pbtxt of the model repository from `spec`.

The configs committed under model_repository/ are this module's output for the
published checkpoint's sizes (a test keeps them in sync); the export renders
them again for the sizes of the checker it exports.

`python -m export.configs` rewrites the committed ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable

from safety_checker_client import spec
from safety_checker_client.spec import ModelDims, TensorSpec

# Where each rendered file goes, relative to the repository root.
ENSEMBLE_CONFIG = Path(spec.ENSEMBLE_MODEL, "config.pbtxt")
UINT8_ENSEMBLE_CONFIG = Path(spec.UINT8_ENSEMBLE_MODEL, "config.pbtxt")
NORMALIZE_GPU_CONFIG = Path(spec.NORMALIZE_MODEL, "config.pbtxt")
NORMALIZE_CPU_CONFIG = Path(spec.NORMALIZE_MODEL, "configs", "cpu.pbtxt")
EMBEDDER_GPU_CONFIG = Path(spec.EMBEDDER_MODEL, "config.pbtxt")
EMBEDDER_CPU_CONFIG = Path(spec.EMBEDDER_MODEL, "configs", "cpu.pbtxt")
POSTPROCESS_CONFIG = Path(spec.POSTPROCESS_MODEL, "config.pbtxt")

# The name given to --model-config-name by the bundled CPU server.
CPU_CONFIG_NAME = "cpu"

# GPU: TensorRT engine profile, cache and batching.
GPU_OPT_BATCH = 16
GPU_PREFERRED_BATCH_SIZES = (16, 32)
GPU_WORKSPACE_BYTES = 4 << 30
GPU_ENGINE_CACHE = "/trt-cache"

# Dynamic batching: how long a request may wait for others to fill a batch.
GPU_QUEUE_DELAY_US = 2000
CPU_QUEUE_DELAY_US = 0
POSTPROCESS_QUEUE_DELAY_US = 500


def _tensors(kind: str, tensors: Iterable[TensorSpec], dims: ModelDims) -> str:
    entries = []
    for tensor in tensors:
        shape = ", ".join(str(d) for d in tensor.resolve(dims))
        entries.append(
            f'  {{\n    name: "{tensor.name}"\n    data_type: {tensor.config_type}\n    dims: [ {shape} ]\n  }}'
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _io(inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec], dims: ModelDims) -> str:
    return _tensors("input", inputs, dims) + _tensors("output", outputs, dims)


def _maps(kind: str, tensors: Iterable[TensorSpec]) -> str:
    return "".join(f'      {kind} {{ key: "{t.name}" value: "{t.name}" }}\n' for t in tensors)


# Ensemble steps: (model, its inputs, its outputs, what it does). Every step
# maps tensors under their own names, which spec keeps unique.
_EMBED_STEP = (spec.EMBEDDER_MODEL, spec.EMBEDDER_INPUTS, spec.EMBEDDER_OUTPUTS,
               "ONNX graph: CLIP vision tower, projection, cosines to the concepts.")
_POSTPROCESS_STEP = (spec.POSTPROCESS_MODEL, spec.POSTPROCESS_INPUTS, spec.POSTPROCESS_OUTPUTS,
                     "Python: thresholds, rounding and the special-care rule, as diffusers.")
_NORMALIZE_STEP = (spec.NORMALIZE_MODEL, spec.NORMALIZE_INPUTS, spec.NORMALIZE_OUTPUTS,
                   "ONNX lookup table: rescale and normalise, exactly as CLIPImageProcessor.")


def _ensemble(name: str, description: str, inputs, outputs, steps, dims: ModelDims) -> str:
    rendered = ",\n".join(
        f"""    {{
      # {comment}
      model_name: "{model}"
      model_version: -1
{_maps("input_map", step_inputs)}{_maps("output_map", step_outputs)}    }}"""
        for model, step_inputs, step_outputs, comment in steps
    )
    return f"""{description}
name: "{name}"
platform: "ensemble"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(inputs, outputs, dims)}
ensemble_scheduling {{
  step [
{rendered}
  ]
}}
"""


def render_ensemble(dims: ModelDims) -> str:
    return _ensemble(spec.ENSEMBLE_MODEL, """# The guardrail's public contract: CLIP pixel_values in, per image the
# decision diffusers' StableDiffusionSafetyChecker.forward() takes, the rounded
# per-concept scores behind it and the projected image embedding.""",
                     spec.ENSEMBLE_INPUTS, spec.ENSEMBLE_OUTPUTS, (_EMBED_STEP, _POSTPROCESS_STEP), dims)


def render_uint8_ensemble(dims: ModelDims) -> str:
    return _ensemble(spec.UINT8_ENSEMBLE_MODEL, f"""# The same checker for clients that send resized and cropped uint8
# RGB images (150 KB per image instead of 602 KB of float32 pixel_values);
# the server normalises them. Same outputs and decisions as "{spec.ENSEMBLE_MODEL}".""",
                     spec.UINT8_ENSEMBLE_INPUTS, spec.UINT8_ENSEMBLE_OUTPUTS,
                     (_NORMALIZE_STEP, _EMBED_STEP, _POSTPROCESS_STEP), dims)


def render_normalize_gpu(dims: ModelDims) -> str:
    return f"""# uint8 images -> pixel_values on the GPU with the onnxruntime backend. No
# dynamic batching here: each request goes straight on to the embedder, which
# batches. configs/{CPU_CONFIG_NAME}.pbtxt runs the same model.onnx on CPU.
name: "{spec.NORMALIZE_MODEL}"
backend: "onnxruntime"
default_model_filename: "{spec.ONNX_FILENAME}"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(spec.NORMALIZE_INPUTS, spec.NORMALIZE_OUTPUTS, dims)}
instance_group [
  {{
    kind: KIND_GPU
    count: 1
  }}
]
"""


def render_normalize_cpu(dims: ModelDims) -> str:
    return f"""# uint8 images -> pixel_values on CPU: the embedder's Python onnxruntime
# runner (1/model.py) on this folder's model.onnx, a table lookup that takes
# about a millisecond per image on one thread.
name: "{spec.NORMALIZE_MODEL}"
backend: "python"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(spec.NORMALIZE_INPUTS, spec.NORMALIZE_OUTPUTS, dims)}
instance_group [
  {{
    kind: KIND_CPU
    count: 1
  }}
]

parameters [
  {{
    key: "onnx_filename"
    value: {{ string_value: "{spec.ONNX_FILENAME}" }}
  }},
  {{
    key: "intra_op_num_threads"
    value: {{ string_value: "1" }}
  }}
]
"""


def _profile_shape(tensor: TensorSpec, batch: int) -> str:
    return f"{tensor.name}:" + "x".join(str(d) for d in (batch, *tensor.dims))


def _warmup(batch: int) -> str:
    """One request of `batch` zero images at load, so the first user request is not the slow one."""
    pixels = spec.PIXEL_VALUES
    return f"""model_warmup [
  {{
    name: "zero batch of {batch}"
    batch_size: {batch}
    inputs {{
      key: "{pixels.name}"
      value: {{ data_type: TYPE_{pixels.datatype} dims: [ {", ".join(str(d) for d in pixels.dims)} ] zero_data: true }}
    }}
  }}
]
"""


def render_embedder_gpu(dims: ModelDims) -> str:
    pixels = spec.PIXEL_VALUES
    trt = {
        "precision_mode": "FP16",
        "trt_layer_norm_fp32_fallback": "1",
        "max_workspace_size_bytes": str(GPU_WORKSPACE_BYTES),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": GPU_ENGINE_CACHE,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": GPU_ENGINE_CACHE,
        "trt_profile_min_shapes": _profile_shape(pixels, 1),
        "trt_profile_opt_shapes": _profile_shape(pixels, GPU_OPT_BATCH),
        "trt_profile_max_shapes": _profile_shape(pixels, spec.MAX_BATCH_SIZE),
    }
    parameters = "".join(f'        parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in trt.items())
    preferred = ", ".join(str(b) for b in GPU_PREFERRED_BATCH_SIZES)
    return f"""# Embedder on a GPU with Triton's onnxruntime backend (NGC container), the
# default config; the bundled CPU server selects configs/{CPU_CONFIG_NAME}.pbtxt with
# --model-config-name={CPU_CONFIG_NAME}. Both serve the same model.onnx.
#
# TensorRT runs the graph in FP16 with LayerNorm kept in FP32 (ViT activations
# lose too much in FP16 LayerNorm). FP16 moves cosines by about 1e-3, so a
# score next to a threshold can round the other way than diffusers' fp32;
# delete the optimization block (CUDA, fp32) where exact parity matters more
# than speed. The engine is built once per GPU model for batch 1..{spec.MAX_BATCH_SIZE}
# (tuned for {GPU_OPT_BATCH}) and cached in {GPU_ENGINE_CACHE} (a volume in docker-compose.yml),
# so restarts skip the minutes-long build; the warmup request triggers it at
# load, before the model reports ready.
name: "{spec.EMBEDDER_MODEL}"
backend: "onnxruntime"
default_model_filename: "{spec.ONNX_FILENAME}"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(spec.EMBEDDER_INPUTS, spec.EMBEDDER_OUTPUTS, dims)}
instance_group [
  {{
    kind: KIND_GPU
    count: 1
  }}
]

# A GPU is most efficient on large batches: wait up to {GPU_QUEUE_DELAY_US} us to fill one.
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {GPU_QUEUE_DELAY_US}
}}

optimization {{
  execution_accelerators {{
    gpu_execution_accelerator: [
      {{
        name: "tensorrt"
{parameters}      }}
    ]
  }}
}}

{_warmup(spec.MAX_BATCH_SIZE)}"""


def render_embedder_cpu(dims: ModelDims) -> str:
    return f"""# Embedder on CPU: a Python-backend model running the same model.onnx with
# onnxruntime (the bundled tritonserver has no onnxruntime backend).
# Selected with --model-config-name={CPU_CONFIG_NAME}.
name: "{spec.EMBEDDER_MODEL}"
backend: "python"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(spec.EMBEDDER_INPUTS, spec.EMBEDDER_OUTPUTS, dims)}
# Tuned with `make bench` on a 2-core AVX2 machine (README, "CPU and GPU
# configurations"): one instance, because onnxruntime already keeps every
# core busy on one image and two single-thread instances were no faster; and
# no queue delay, because on a CPU a bigger batch does not make an image
# cheaper. Requests that arrive while a batch runs (about a second per image)
# still go together into the next one; a request that finds the model idle
# starts at once.
instance_group [
  {{
    kind: KIND_CPU
    count: 1
  }}
]

dynamic_batching {{
  max_queue_delay_microseconds: {CPU_QUEUE_DELAY_US}
}}

parameters [
  {{
    # The ONNX file in the version folder, shared with the onnxruntime backend.
    key: "onnx_filename"
    value: {{ string_value: "{spec.ONNX_FILENAME}" }}
  }},
  {{
    # onnxruntime intra-op threads; 0 lets it use all physical cores. Any
    # onnxruntime session config entry ("session.*") may be added the same way.
    key: "intra_op_num_threads"
    value: {{ string_value: "0" }}
  }}
]

{_warmup(1)}"""


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_postprocess(dims: ModelDims, strictness: str = spec.DEFAULT_STRICTNESS) -> str:
    if strictness not in spec.STRICTNESS_PRESETS:
        raise ValueError(f"unknown strictness preset {strictness!r} (one of {', '.join(spec.STRICTNESS_PRESETS)})")
    presets = json.dumps(spec.STRICTNESS_PRESETS)
    return f"""# Thresholds, rounding and the special-care rule of diffusers'
# StableDiffusionSafetyChecker.forward(), vectorised over every request of a
# batch. Thresholds are read from 1/{spec.CONCEPTS_FILENAME}, written by the export;
# custom concepts from 1/{spec.CUSTOM_CONCEPTS_FILENAME}, re-read whenever it changes.
name: "{spec.POSTPROCESS_MODEL}"
backend: "python"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(spec.POSTPROCESS_INPUTS, spec.POSTPROCESS_OUTPUTS, dims)}
instance_group [
  {{
    kind: KIND_CPU
    count: 1
  }}
]

dynamic_batching {{
  max_queue_delay_microseconds: {POSTPROCESS_QUEUE_DELAY_US}
}}

parameters [
  {{
    # The strictness preset every request gets unless it sends the request
    # parameter "{spec.STRICTNESS_PARAMETER}" (a preset) or "{spec.STRICTNESS_ADJUSTMENT_PARAMETER}" (a number).
    # "{spec.DEFAULT_STRICTNESS}" reproduces the reference checker exactly.
    key: "{spec.STRICTNESS_CONFIG_KEY}"
    value: {{ string_value: "{strictness}" }}
  }},
  {{
    # Adjustment added to every score before the "> 0" test (diffusers PR #9068).
    key: "strictness_presets"
    value: {{ string_value: {_pbtxt_string(presets)} }}
  }},
  {{
    # Largest |strictness_adjustment| a request may ask for.
    key: "max_strictness_adjustment"
    value: {{ string_value: "{spec.MAX_STRICTNESS_ADJUSTMENT:g}" }}
  }},
  {{
    key: "custom_concepts_file"
    value: {{ string_value: "{spec.CUSTOM_CONCEPTS_FILENAME}" }}
  }}
]
"""


def render_all(dims: ModelDims, strictness: str = spec.DEFAULT_STRICTNESS) -> Dict[Path, str]:
    return {
        ENSEMBLE_CONFIG: render_ensemble(dims),
        UINT8_ENSEMBLE_CONFIG: render_uint8_ensemble(dims),
        NORMALIZE_GPU_CONFIG: render_normalize_gpu(dims),
        NORMALIZE_CPU_CONFIG: render_normalize_cpu(dims),
        EMBEDDER_GPU_CONFIG: render_embedder_gpu(dims),
        EMBEDDER_CPU_CONFIG: render_embedder_cpu(dims),
        POSTPROCESS_CONFIG: render_postprocess(dims, strictness),
    }


def write_all(repository: Path, dims: ModelDims, strictness: str = spec.DEFAULT_STRICTNESS) -> None:
    for relative, text in render_all(dims, strictness).items():
        target = repository / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


if __name__ == "__main__":
    write_all(Path(__file__).resolve().parent.parent / "model_repository", spec.REFERENCE_DIMS)
