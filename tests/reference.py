"""Run diffusers' StableDiffusionSafetyChecker.forward() and keep what it computes.

forward() returns only the decision and throws the per-concept scores away;
a profiler hook reads its local `result` when it returns, so the tests compare
with the reference's own numbers rather than with a copy of its code.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch import nn


def _forward_code():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    return inspect.unwrap(StableDiffusionSafetyChecker.forward).__code__


def diffusers_forward(checker: nn.Module, clip_input: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flagged [N], concept_scores [N, K], special_scores [N, S]) exactly as forward() computed them."""
    code = _forward_code()
    captured = {}

    def hook(frame, event, arg):
        if event == "return" and frame.f_code is code:
            captured["result"] = frame.f_locals["result"]

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        with torch.no_grad():
            _, flagged = checker(images=[np.zeros(1)] * len(clip_input), clip_input=clip_input)
    finally:
        sys.setprofile(previous)
    result: List[dict] = captured["result"]
    concept = np.array([[img["concept_scores"][k] for k in sorted(img["concept_scores"])] for img in result])
    special = np.array([[img["special_scores"][k] for k in sorted(img["special_scores"])] for img in result])
    return np.array(flagged, dtype=bool), concept.reshape(len(result), -1), special.reshape(len(result), -1)


class _FixedPooled(nn.Module):
    """Stands in for the vision tower when the cosines themselves are injected."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, clip_input: torch.Tensor):
        return None, torch.zeros(len(clip_input), self.hidden)


@contextmanager
def injected_cosines(checker: nn.Module, concept_cos: np.ndarray, special_cos: np.ndarray) -> Iterator[torch.Tensor]:
    """Make forward() see the given cosines; yields the clip_input to pass it."""
    import diffusers.pipelines.stable_diffusion.safety_checker as module

    original_cosine, original_tower = module.cosine_distance, checker.vision_model

    def cosine_distance(image_embeds, text_embeds):
        chosen = special_cos if text_embeds is checker.special_care_embeds else concept_cos
        return torch.from_numpy(np.ascontiguousarray(chosen, dtype=np.float32))

    module.cosine_distance = cosine_distance
    checker.vision_model = _FixedPooled(checker.visual_projection.in_features)
    try:
        yield torch.zeros(len(concept_cos), 1)
    finally:
        module.cosine_distance = original_cosine
        checker.vision_model = original_tower
