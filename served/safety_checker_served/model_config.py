"""A Python model's config as Triton hands it to `initialize`: tensor names by position, parameters by key.

Every served Python model reads its tensor names and settings here, from the
config that export/models.py rendered, never from constants of its own.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping


class ModelConfig:
    def __init__(self, args: Mapping[str, str]) -> None:
        """`args`: what Triton passes to `initialize` (model_config is JSON text)."""
        config = json.loads(args["model_config"])
        self.name: str = args["model_name"]
        self.raw = config
        self.inputs: List[str] = [tensor["name"] for tensor in config.get("input", [])]
        self.outputs: List[str] = [tensor["name"] for tensor in config.get("output", [])]
        # Triton passes every parameter as {"string_value": ...}.
        self.parameters: Dict[str, str] = {
            key: value["string_value"] for key, value in config.get("parameters", {}).items()
        }
        self.version_dir = os.path.join(args["model_repository"], args["model_version"])

    def dims(self, output: str) -> List[int]:
        """An output's dims (without the batch dimension)."""
        (tensor,) = [t for t in self.raw["output"] if t["name"] == output]
        return [int(d) for d in tensor["dims"]]
