"""Export the embedder graph to ONNX and prove it matches PyTorch before use.

Like optimum's exporters, the export is only accepted after onnxruntime has
run the file and its cosines agree with the PyTorch model on random inputs.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from export.graph import EmbedderGraph
from safety_checker_client import spec

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-5
# Batch sizes the verification runs, so that the dynamic batch axis is proven too.
VERIFY_BATCH_SIZES = (1, 3)


class VerificationError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch model."""


class DecomposedLayerNorm(nn.Module):
    """A LayerNorm that exports as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add.

    Why not opset 17's LayerNormalization: onnxruntime's TensorRT option
    trt_layer_norm_fp32_fallback (the fast GPU config) keeps exactly this
    Pow -> ReduceMean in fp32, the variance that overflows in FP16, and has no
    hold on a LayerNormalization node. onnxruntime's CPU and CUDA providers fuse
    the pattern back into their LayerNormalization kernel, and the export's
    verification holds it to PyTorch's LayerNorm like everything else.
    """

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        variance = centred.pow(2).mean(-1, keepdim=True)
        return centred / torch.sqrt(variance + self.eps) * self.weight + self.bias


def with_decomposed_layer_norms(module: nn.Module) -> nn.Module:
    """A copy of `module` whose every nn.LayerNorm (over the last dimension) is a DecomposedLayerNorm."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.LayerNorm):
            if len(child.normalized_shape) != 1:
                raise ValueError(f"{name}: only a LayerNorm over the last dimension can be decomposed")
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attribute, DecomposedLayerNorm(child))
    return module


def export_onnx(graph: EmbedderGraph, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write `graph` as a single-file fp32 ONNX model with a dynamic batch axis, LayerNorms decomposed."""
    graph = with_decomposed_layer_norms(graph)
    names_in = [t.name for t in spec.EMBEDDER_INPUTS]
    names_out = [t.name for t in spec.EMBEDDER_OUTPUTS]
    example = torch.zeros(2, spec.NUM_CHANNELS, spec.IMAGE_SIZE, spec.IMAGE_SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.eval(),
            (example,),
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes={name: {0: "batch"} for name in names_in + names_out},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def reference_outputs(checker: torch.nn.Module, pixels: torch.Tensor) -> dict:
    """Image embeddings and cosines exactly as diffusers' forward() computes them."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        image_embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        return {
            spec.IMAGE_EMBEDS.name: image_embeds.numpy(),
            spec.CONCEPT_COSINES.name: cosine_distance(image_embeds, checker.concept_embeds).float().numpy(),
            spec.SPECIAL_COSINES.name: cosine_distance(image_embeds, checker.special_care_embeds).float().numpy(),
        }


def verify_onnx(
    checker: torch.nn.Module,
    path: Path,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
    seed: int = 0,
) -> float:
    """Return the max abs cosine difference to diffusers, raising VerificationError above `tolerance`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output_names = [t.name for t in spec.EMBEDDER_OUTPUTS]
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        pixels = torch.randn(batch, spec.NUM_CHANNELS, spec.IMAGE_SIZE, spec.IMAGE_SIZE, generator=generator)
        expected = reference_outputs(checker, pixels)
        got = dict(zip(output_names, session.run(output_names, {spec.PIXEL_VALUES.name: pixels.numpy()})))
        for name, want in expected.items():
            if got[name].shape != want.shape:
                raise VerificationError(f"ONNX output {name} has shape {got[name].shape}, PyTorch gives {want.shape}")
        for name in (spec.CONCEPT_COSINES.name, spec.SPECIAL_COSINES.name):
            diff = float(np.max(np.abs(expected[name].astype(np.float64) - got[name])))
            worst = max(worst, diff if np.isfinite(diff) else float("inf"))
        if np.any(got[spec.NONFINITE_VALUES.name] != 0):
            raise VerificationError("ONNX graph counts non-finite pixels in finite input")
    if worst > tolerance:
        raise VerificationError(
            f"ONNX cosines differ from PyTorch by {worst:.3g} (max abs), above the tolerance {tolerance:g}"
        )
    return worst
