"""Render every config.pbtxt of the model repository from the model descriptions (`export.models`).

The configs committed under model_repository/ are this module's output for the
published checkpoint's sizes (a test keeps them in sync); the export renders
them again for the sizes of the checker it exports.

`python -m export.configs` rewrites the committed ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable

from export.description import FAST_CONFIG_NAME, SOURCE_REPOSITORY, Parameter, ServedModel, Step, Variant
from export.models import REFERENCE_SETTINGS, Settings, committed_models, served_models
from safety_checker_client import spec
from safety_checker_client.spec import ModelDims, TensorSpec

# Where the rendered files the tests look at go, relative to the repository root.
POSTPROCESS_CONFIG = Path(spec.POSTPROCESS_MODEL, "config.pbtxt")
EMBEDDER_EXACT_GPU_CONFIG = Path(spec.EMBEDDER_MODEL, "config.pbtxt")
EMBEDDER_FAST_GPU_CONFIG = Path(spec.EMBEDDER_MODEL, "configs", f"{FAST_CONFIG_NAME}.pbtxt")


def _comment(text: str, indent: str = "") -> str:
    return "".join(f"{indent}# {line}".rstrip() + "\n" for line in text.splitlines()) if text else ""


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensors(kind: str, tensors: Iterable[TensorSpec], dims: ModelDims) -> str:
    entries = []
    for tensor in tensors:
        shape = ", ".join(str(d) for d in tensor.resolve(dims))
        optional = "\n    optional: true" if tensor.optional else ""
        entries.append(
            f'  {{\n    name: "{tensor.name}"\n    data_type: {tensor.config_type}\n'
            f"    dims: [ {shape} ]{optional}\n  }}"
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def _maps(kind: str, tensors: Iterable[TensorSpec], renamed: Dict[str, str]) -> str:
    return "".join(f'      {kind} {{ key: "{t.name}" value: "{renamed.get(t.name, t.name)}" }}\n' for t in tensors)


def _steps(steps: Iterable[Step]) -> str:
    rendered = ",\n".join(
        f"""    {{
{_comment(step.comment, "      ")}      model_name: "{step.model}"
      model_version: -1
{_maps("input_map", step.inputs, dict(step.renamed))}{_maps("output_map", step.outputs, dict(step.renamed))}    }}"""
        for step in steps
    )
    return f"\nensemble_scheduling {{\n  step [\n{rendered}\n  ]\n}}\n"


def _instances(variant: Variant) -> str:
    return f"""{_comment(variant.comment_instances)}instance_group [
  {{
    kind: {variant.instance_kind}
    count: {variant.instance_count}
  }}
]
"""


def _batching(variant: Variant) -> str:
    batching = variant.batching
    if batching is None:
        return ""
    preferred = ", ".join(str(b) for b in batching.preferred_batch_sizes)
    preferred_line = f"  preferred_batch_size: [ {preferred} ]\n" if preferred else ""
    return f"""
{_comment(batching.comment)}dynamic_batching {{
{preferred_line}  max_queue_delay_microseconds: {batching.max_queue_delay_us}
  priority_levels: {batching.priority_levels}
  default_priority_level: {batching.default_priority_level}
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {batching.queue_timeout_us}
    allow_timeout_override: true
    max_queue_size: {batching.max_queue_size}
  }}
}}
"""


def _parameter(parameter: Parameter) -> str:
    return f"""  {{
{_comment(parameter.comment, "    ")}    key: "{parameter.key}"
    value: {{ string_value: {_pbtxt_string(parameter.value)} }}
  }}"""


def _parameters(parameters: Iterable[Parameter]) -> str:
    entries = ",\n".join(_parameter(p) for p in parameters)
    return f"\nparameters [\n{entries}\n]\n" if entries else ""


def _accelerator(variant: Variant) -> str:
    if variant.accelerator is None:
        return ""
    entries = "".join(f'        parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in variant.accelerator.parameters)
    return f"""
optimization {{
  execution_accelerators {{
    gpu_execution_accelerator: [
      {{
        name: "{variant.accelerator.name}"
{entries}      }}
    ]
  }}
}}
"""


def _warmup(variant: Variant) -> str:
    """One request of zero images at load, so the first user request is not the slow one."""
    if variant.warmup_batch is None:
        return ""
    batch, pixels = variant.warmup_batch, spec.PIXEL_VALUES
    return f"""
model_warmup [
  {{
    name: "zero batch of {batch}"
    batch_size: {batch}
    inputs {{
      key: "{pixels.name}"
      value: {{ data_type: {pixels.config_type} dims: [ {", ".join(str(d) for d in pixels.dims)} ] zero_data: true }}
    }}
  }}
]
"""


def render(model: ServedModel, variant: Variant, dims: ModelDims) -> str:
    """One config file of one model."""
    if variant.backend == "ensemble":
        head = f'name: "{model.name}"\nplatform: "ensemble"\n'
    else:
        head = f'name: "{model.name}"\nbackend: "{variant.backend}"\n'
        if variant.default_model_filename:
            head += f'default_model_filename: "{variant.default_model_filename}"\n'
    io = _tensors("input", model.inputs, dims) + _tensors("output", model.outputs, dims)
    body = _steps(model.steps) if model.steps else "\n" + _instances(variant)
    return (
        f"{_comment(variant.comment)}{head}max_batch_size: {model.max_batch_size}\n{io}{body}"
        f"{_batching(variant)}{_parameters(variant.parameters)}{_accelerator(variant)}{_warmup(variant)}"
    )


def render_all(dims: ModelDims, settings: Settings = REFERENCE_SETTINGS) -> Dict[Path, str]:
    """Every config file of the repository, by its path relative to the repository root."""
    return {
        Path(model.name, variant.path): render(model, variant, dims)
        for model in served_models(settings)
        for variant in model.variants
    }


def render_committed() -> Dict[Path, str]:
    """What model_repository/ holds: a plain export's configs and the cascade's, for the published sizes."""
    return {
        Path(model.name, variant.path): render(model, variant, spec.REFERENCE_DIMS)
        for model in committed_models()
        for variant in model.variants
    }


def write_all(repository: Path, dims: ModelDims, settings: Settings = REFERENCE_SETTINGS) -> None:
    _write(repository, render_all(dims, settings))


def _write(repository: Path, rendered: Dict[Path, str]) -> None:
    for relative, text in rendered.items():
        target = repository / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def rewrite_committed() -> None:
    """model_repository/'s configs as rendered now; a config no description renders any more is removed."""
    rendered = render_committed()
    for stale in set(SOURCE_REPOSITORY.glob("*/config.pbtxt")) | set(SOURCE_REPOSITORY.glob("*/configs/*.pbtxt")):
        if stale.relative_to(SOURCE_REPOSITORY) not in rendered:
            stale.unlink()
    _write(SOURCE_REPOSITORY, rendered)


if __name__ == "__main__":
    rewrite_committed()
