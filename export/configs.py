"""Render every config.pbtxt of the model repository from `spec`.

The configs committed under model_repository/ are this module's output for the
published checkpoint's sizes (a test keeps them in sync); the export renders
them again for the sizes of the checker it exports.

`python -m export.configs` rewrites the committed ones, and copies the client's
concept_set.py next to the postprocessor's model.py (a test keeps it in sync).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Iterable

from safety_checker_client import concept_set, spec
from safety_checker_client.spec import ModelDims, TensorSpec

# Where each rendered file goes, relative to the repository root.
ENSEMBLE_CONFIG = Path(spec.ENSEMBLE_MODEL, "config.pbtxt")
EMBEDDER_GPU_CONFIG = Path(spec.EMBEDDER_MODEL, "config.pbtxt")
EMBEDDER_CPU_CONFIG = Path(spec.EMBEDDER_MODEL, "configs", "cpu.pbtxt")
POSTPROCESS_CONFIG = Path(spec.POSTPROCESS_MODEL, "config.pbtxt")
CONCEPT_SET_MODULE = Path(spec.POSTPROCESS_MODEL, spec.POSTPROCESS_VERSION, "concept_set.py")

# The name given to --model-config-name by the bundled CPU server.
CPU_CONFIG_NAME = "cpu"

# Dynamic batching: how long a request may wait for others to fill a batch.
GPU_QUEUE_DELAY_US = 2000
CPU_QUEUE_DELAY_US = 5000
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


def render_ensemble(dims: ModelDims) -> str:
    return f"""# The guardrail's public contract: CLIP pixel_values in, per image the
# decision diffusers' StableDiffusionSafetyChecker.forward() takes, the rounded
# per-concept scores behind it and the projected image embedding.
name: "{spec.ENSEMBLE_MODEL}"
platform: "ensemble"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(spec.ENSEMBLE_INPUTS, spec.ENSEMBLE_OUTPUTS, dims)}
ensemble_scheduling {{
  step [
    {{
      # ONNX graph: CLIP vision tower, projection, cosines to the concepts.
      model_name: "{spec.EMBEDDER_MODEL}"
      model_version: -1
{_maps("input_map", spec.EMBEDDER_INPUTS)}{_maps("output_map", spec.EMBEDDER_OUTPUTS)}    }},
    {{
      # Python: thresholds, rounding and the special-care rule, as diffusers.
      model_name: "{spec.POSTPROCESS_MODEL}"
      model_version: -1
{_maps("input_map", spec.POSTPROCESS_INPUTS)}{_maps("output_map", spec.POSTPROCESS_OUTPUTS)}    }}
  ]
}}
"""


def render_embedder_gpu(dims: ModelDims) -> str:
    return f"""# Embedder on a GPU with Triton's onnxruntime backend (NGC container).
# This is the default config; the bundled CPU server selects configs/{CPU_CONFIG_NAME}.pbtxt
# with --model-config-name={CPU_CONFIG_NAME}. Both serve the same model.onnx.
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

# Requests that arrive within the delay are run as one batch.
dynamic_batching {{
  max_queue_delay_microseconds: {GPU_QUEUE_DELAY_US}
}}
"""


def render_embedder_cpu(dims: ModelDims) -> str:
    return f"""# Embedder on CPU: a Python-backend model running the same model.onnx with
# onnxruntime (the bundled tritonserver has no onnxruntime backend).
# Selected with --model-config-name={CPU_CONFIG_NAME}.
name: "{spec.EMBEDDER_MODEL}"
backend: "python"
max_batch_size: {spec.MAX_BATCH_SIZE}
{_io(spec.EMBEDDER_INPUTS, spec.EMBEDDER_OUTPUTS, dims)}
# One instance: onnxruntime already uses every core for one batch.
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
    # onnxruntime intra-op threads; 0 lets it use all physical cores.
    key: "intra_op_num_threads"
    value: {{ string_value: "0" }}
  }}
]
"""


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
        EMBEDDER_GPU_CONFIG: render_embedder_gpu(dims),
        EMBEDDER_CPU_CONFIG: render_embedder_cpu(dims),
        POSTPROCESS_CONFIG: render_postprocess(dims, strictness),
    }


def shared_files() -> Dict[Path, Path]:
    """Client modules the served models import too: {path in the repository: the client's file}.

    The postprocessor reads custom_concepts.json with the very module the
    `safety-checker concepts` commands write it with.
    """
    return {CONCEPT_SET_MODULE: Path(concept_set.__file__)}


def write_all(repository: Path, dims: ModelDims, strictness: str = spec.DEFAULT_STRICTNESS) -> None:
    """Render every config.pbtxt and copy the shared client modules into `repository`."""
    for relative, text in render_all(dims, strictness).items():
        target = repository / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for relative, source in shared_files().items():
        (repository / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, repository / relative)


if __name__ == "__main__":
    write_all(Path(__file__).resolve().parent.parent / "model_repository", spec.REFERENCE_DIMS)
