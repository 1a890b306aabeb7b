"""The network that is exported: everything in the checker up to the cosines.

The thresholds are deliberately left out of the graph: diffusers rounds the
margins in NumPy (float64 arithmetic on float32 cosines, half to even), which a
Python postprocessor reproduces exactly and an ONNX graph would not.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F


class EmbedderGraph(nn.Module):
    """pixel_values -> (image_embeds, concept_cosines, special_cosines, nonfinite_values)."""

    def __init__(self, checker: nn.Module) -> None:
        super().__init__()
        self.vision_model = checker.vision_model
        self.visual_projection = checker.visual_projection
        # The reference re-normalises the concept rows at every call; doing it
        # once here gives the same float32 values (same F.normalize).
        self.register_buffer("concepts", F.normalize(checker.concept_embeds.detach().float()).t().contiguous())
        self.register_buffer("special", F.normalize(checker.special_care_embeds.detach().float()).t().contiguous())

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        pooled = self.vision_model(pixel_values)[1]
        image_embeds = self.visual_projection(pooled)
        normalized = F.normalize(image_embeds)
        concept_cosines = torch.mm(normalized, self.concepts)
        special_cosines = torch.mm(normalized, self.special)
        # x - x is 0 for every finite x and NaN for NaN and +-Inf, so IsNaN of it counts exactly the
        # non-finite pixels. torch.isfinite/isinf export as Cast(DOUBLE) -> IsInf, and TensorRT has
        # no DOUBLE: those nodes would fall out of the engine and split the graph.
        nonfinite_values = torch.isnan(pixel_values - pixel_values).flatten(1).sum(dim=1, keepdim=True)
        return image_embeds, concept_cosines, special_cosines, nonfinite_values
