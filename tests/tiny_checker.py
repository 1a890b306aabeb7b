"""Tiny random-weight StableDiffusionSafetyCheckers saved with save_pretrained.

No weights can be downloaded in tests, so the real loading code runs on these.
The vision tower keeps the real input size (3x224x224, patch 14) and the real
17 + 3 concepts with the published thresholds; only the widths are tiny.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

DATA = Path(__file__).parent / "data"
THRESHOLDS = json.loads((DATA / "reference_thresholds.json").read_text())


def tiny_config(projection_dim: int = 16):
    from transformers import CLIPConfig

    return CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=projection_dim),
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=99, max_position_embeddings=77, projection_dim=projection_dim,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=projection_dim,
    )


def build_tiny_checker(seed: int = 0, projection_dim: int = 16,
                       concept_thresholds: Optional[Sequence[float]] = None,
                       special_thresholds: Optional[Sequence[float]] = None):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(tiny_config(projection_dim)).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.copy_(torch.tensor(
            concept_thresholds if concept_thresholds is not None else THRESHOLDS["concept_embeds_weights"]))
        checker.special_care_embeds_weights.copy_(torch.tensor(
            special_thresholds if special_thresholds is not None else THRESHOLDS["special_care_embeds_weights"]))
    return checker


def save_tiny_checker(path: Path, checker=None) -> Path:
    """Save like the published checkpoint: weights, config and the CLIP preprocessor config."""
    (checker if checker is not None else build_tiny_checker()).save_pretrained(str(path))
    shutil.copyfile(DATA / "preprocessor_config.json", path / "preprocessor_config.json")
    return path
