"""The benchmarked checker: the published architecture with random weights.

No weights can be downloaded here, and speed does not depend on their values,
so the benchmark builds `StableDiffusionSafetyChecker` from the published
config (data/compvis-config.json, a copy of the checkpoint's config.json) and
saves it as the checkpoint would be saved. `--quick` shrinks the widths to a
few dozen so the harness itself can be tested in seconds.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Dict

DATA = Path(__file__).resolve().parent / "data"
FULL_CONFIG = DATA / "compvis-config.json"
PREPROCESSOR_CONFIG = DATA / "preprocessor_config.json"
THRESHOLDS = DATA / "thresholds.json"

# --quick: the same graph with tiny widths (the real 3x224x224 input and patch 14).
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   projection_dim=16)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=99, projection_dim=16)


def checker_config(quick: bool) -> Dict[str, Any]:
    config = json.loads(FULL_CONFIG.read_text())
    if quick:
        config = copy.deepcopy(config)
        config["vision_config"].update(TINY_VISION)
        config["text_config"].update(TINY_TEXT)
        config["projection_dim"] = TINY_VISION["projection_dim"]
    return config


def save_random_checker(directory: Path, quick: bool, seed: int = 0) -> Dict[str, Any]:
    """Save a random-weight checker with the published thresholds; returns its config."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = checker_config(quick)
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(CLIPConfig(**config)).eval()
    thresholds = json.loads(THRESHOLDS.read_text())
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.copy_(torch.tensor(thresholds["concept_embeds_weights"]))
        checker.special_care_embeds_weights.copy_(torch.tensor(thresholds["special_care_embeds_weights"]))
    checker.save_pretrained(str(directory))
    shutil.copyfile(PREPROCESSOR_CONFIG, directory / "preprocessor_config.json")
    return config
