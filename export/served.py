"""Modules of the served Python models, imported from model_repository/ itself.

The export and the benchmark use the very code the server runs (the scoring
rule, the onnxruntime session options), never a copy of it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def served_module(model: str, module: str) -> ModuleType:
    """`model_repository/<model>/1/<module>.py`, imported without Triton's Python backend."""
    path = SOURCE_REPOSITORY / model / "1" / f"{module}.py"
    module_spec = importlib.util.spec_from_file_location(f"served_{model}_{module}", path)
    loaded = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(loaded)
    return loaded
