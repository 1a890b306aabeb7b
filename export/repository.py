"""Assemble a complete, servable model repository in a staging folder, then swap it in.

Nothing in the destination changes until the whole repository is written, so
a failed export never leaves a half-updated repository behind. The operator's
custom concept set (safety_checker_postprocess/1/custom_concepts.json) is
carried over byte for byte; a first export writes an empty one (version 0).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from export import configs, environment
from export.description import SOURCE_REPOSITORY
from export.models import REFERENCE_SETTINGS, Settings, served_models
from export.normalize import write_normalizer
from export.parameters import ENVIRONMENT_FILENAME
from export.quantize import REPORT_FILENAME
from safety_checker_client import spec
from safety_checker_client.spec import ModelDims
from safety_checker_served import concept_set, concept_writer

MODEL_FOLDERS = tuple(model.name for model in served_models())
# Every model folder an export writes, cascade or not: a re-export removes the ones it no longer serves.
OWNED_FOLDERS = frozenset(MODEL_FOLDERS) | {m.name for m in served_models(Settings(cascade=True))}
# The health probe every deployment runs (docker-compose, KServe): a file at the repository root, which Triton
# does not look at (it loads folders), so the container finds it where the repository is mounted.
HEALTH_PROBE_FILENAME = "health_probe.py"
HEALTH_PROBE = SOURCE_REPOSITORY / HEALTH_PROBE_FILENAME
# Generated files that may sit in a developer's model_repository/ and are never copied from it.
_NOT_COPIED = shutil.ignore_patterns(
    "__pycache__",
    "*.onnx",
    "*.onnx.data",
    spec.CONCEPTS_FILENAME,
    REPORT_FILENAME,
    spec.CUSTOM_CONCEPTS_FILENAME,
    f".{spec.CUSTOM_CONCEPTS_FILENAME}.*",
)


class RepositoryError(RuntimeError):
    """The destination holds something the export must not overwrite or cannot keep."""


def custom_concepts_path(repository: Path) -> Path:
    return Path(repository) / spec.POSTPROCESS_MODEL / spec.POSTPROCESS_VERSION / spec.CUSTOM_CONCEPTS_FILENAME


def existing_custom_concepts(destination: Path, dims: ModelDims) -> Optional[bytes]:
    """The destination's custom concept file, kept byte for byte by a re-export; None if there is none.

    A file the new checker could not serve (invalid, or embeddings of another
    width) stops the export before anything is written: overwriting it would
    lose the operator's concepts, keeping it would stop the server from loading.
    """
    path = custom_concepts_path(destination)
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        concept_set.parse(data, embedding_dim=dims.projection_dim, origin=str(path))
    except concept_set.ConceptSetError as error:
        raise RepositoryError(
            f"the repository's custom concept set cannot be kept: {error}; fix it, or move it "
            "away to start with an empty set"
        ) from None
    return data


def model_dims(checker: Any) -> ModelDims:
    return ModelDims(
        num_concepts=int(checker.concept_embeds.shape[0]),
        num_special=int(checker.special_care_embeds.shape[0]),
        projection_dim=int(checker.visual_projection.out_features),
    )


def concept_metadata(checker: Any, source: str) -> Dict[str, Any]:
    """Thresholds as the float32 parameters' exact values, which is what diffusers compares with."""
    concepts = [float(t) for t in checker.concept_embeds_weights.detach().float().tolist()]
    special = [float(t) for t in checker.special_care_embeds_weights.detach().float().tolist()]
    return {
        "format_version": 1,
        "source": source,
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "special_care_adjustment": spec.SPECIAL_CARE_ADJUSTMENT,
        "concepts": [{"name": f"concept_{i:02d}", "threshold": t} for i, t in enumerate(concepts)],
        "special_care": [{"name": f"special_care_{i}", "threshold": t} for i, t in enumerate(special)],
    }


def _digest(path: Path) -> str:
    """The first 16 hex digits of the file's sha256: the TensorRT engine cache prefix of this export."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def write_repository(
    destination: Path,
    onnx_files: Dict[str, Path],
    dims: ModelDims,
    metadata: Dict[str, Any],
    settings: Settings = REFERENCE_SETTINGS,
    quantization: Optional[Dict[str, Any]] = None,
    wheelhouse: Path = environment.DEFAULT_WHEELHOUSE,
    targets: Sequence[environment.PythonTarget] = (),
) -> None:
    """Write the model folders; an existing custom concept set is kept, otherwise an empty one is made.

    `onnx_files`: model name -> the model.onnx it serves (the embedder; the cascade's int8 embedder too).
    `settings`: the export's choices; engine cache keys are the digests of those files.
    `quantization`: the int8 report, stored beside the quantised model.onnx so it is never unlabelled.
    `wheelhouse`: the pinned third-party wheels the Python models' environments are built from.
    `targets`: the Pythons they are built for (default: environment.default_targets()).
    """
    custom = existing_custom_concepts(destination, dims)
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=destination))
    try:
        keys = {model: _digest(path) for model, path in onnx_files.items()}
        settings = dataclasses.replace(
            settings,
            engine_cache_key=keys[spec.EMBEDDER_MODEL],
            int8_engine_cache_key=keys.get(spec.INT8_EMBEDDER_MODEL, settings.int8_engine_cache_key),
        )
        models = served_models(settings)
        environments = environment.build_all(
            (model.requirements for model in models if model.python), wheelhouse=wheelhouse, targets=targets
        )
        for model in models:
            # Version 1 of every model: its model.py, if it has one (an ensemble's is empty, which git does not keep).
            version = SOURCE_REPOSITORY / model.name / "1"
            if version.is_dir():
                shutil.copytree(version, staging / model.name / "1", ignore=_NOT_COPIED)
            (staging / model.name / "1").mkdir(parents=True, exist_ok=True)
            if model.python:
                shutil.copyfile(environments[model.requirements], staging / model.name / ENVIRONMENT_FILENAME)
        configs.write_all(staging, dims, settings)
        for model, path in onnx_files.items():
            shutil.copyfile(path, staging / model / "1" / spec.ONNX_FILENAME)
        if quantization is not None:
            quantised = spec.INT8_EMBEDDER_MODEL if settings.cascade else spec.EMBEDDER_MODEL
            (staging / quantised / "1" / REPORT_FILENAME).write_text(json.dumps(quantization, indent=2) + "\n")
        write_normalizer(staging / spec.NORMALIZE_MODEL / "1" / spec.ONNX_FILENAME)
        (staging / spec.POSTPROCESS_MODEL / "1" / spec.CONCEPTS_FILENAME).write_text(
            json.dumps(metadata, indent=2) + "\n"
        )
        custom_file = custom_concepts_path(staging)
        if custom is not None:
            custom_file.write_bytes(custom)
        else:
            concept_writer.write(custom_file, concept_set.empty(dims.projection_dim))
        shutil.copyfile(HEALTH_PROBE, staging / HEALTH_PROBE_FILENAME)
        written = [model.name for model in models]
        for stale in sorted(OWNED_FOLDERS - set(written)):
            shutil.rmtree(destination / stale, ignore_errors=True)
        for folder in written:
            target = destination / folder
            if target.exists():
                shutil.rmtree(target)
            (staging / folder).rename(target)
        (staging / HEALTH_PROBE_FILENAME).replace(destination / HEALTH_PROBE_FILENAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
