"""`python -m bench.gpu`: the checker's embedder on one GPU in fp32, TF32, bf16 and fp16: speed and agreement.

Run from the repository root, with the client package on the path:

    PYTHONPATH=client python -m bench.gpu [--output FILE] [--peak-tflops T]
    PYTHONPATH=client python -m bench.gpu --device cpu --quick     # what tests/test_gpu_check.py runs

It is prepared for a machine with one CUDA GPU, no network, and only torch,
transformers, onnx, onnxruntime and NumPy (1.x or 2.x) installed; the repository
code it imports is plain NumPy and torch.

No diffusers, by choice: the checker is rebuilt here from the modules that
diffusers' StableDiffusionSafetyChecker (0.42.1) declares, as a transformers
PreTrainedModel with the same config class, creating them in the same order
under the same seed, then drawing the concept rows as `fixtures.checkers.
build_checker` does. The result is parameter for parameter that checker
(tests/test_gpu_check.py compares every tensor). Shipping diffusers as wheels
instead would also mean shipping its dependencies (Pillow is not pure Python)
and trusting its compatibility with whatever transformers is installed there.

Per precision it measures:
- images/s at batch 1, 8, 32 and 128, each batch replayed as a CUDA graph
  captured after warmup (eager, with the reason, if capture fails), and the
  fraction of the GPU's dense FP16 tensor peak that is, from the FLOPs per
  image counted from the model config;
- decision and score agreement with fp32 (TF32 off) at the export's stress
  margins (`export.stress`, as the int8 report does, on the same kind of
  seeded standard-normal pixels), and the max |cosine deviation|.

The vision tower and projection run in the precision under test; the
normalisation and the 20 cosines stay in fp32 (they cost nothing), so the
report shows the tower's error, which a fast engine has to live with, not the
rounding of the last tiny matmul, which it can keep in fp32.

Prints a table, then the report as one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import transformers
from packaging.version import Version
from torch import nn
from torch.nn import functional as F
from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel

from export.graph import EmbedderGraph
from export.stress import stress_agreement
from fixtures.checkers import THRESHOLDS, clip_config
from safety_checker_client import spec

# Dense (no sparsity) FP16 tensor-core TFLOP/s from NVIDIA's data sheets, by device name.
# NVL and other variants are left "unknown" rather than guessed; --peak-tflops overrides.
DENSE_FP16_PEAK_TFLOPS = (
    (r"\bH(100|200)\b(?!.*\b(PCIe|NVL)\b)", 989.4),  # H100 SXM, H200 SXM
    (r"\bH100 PCIe\b", 756.5),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.05),
    (r"\bL4\b", 121.0),
)


@dataclass(frozen=True)
class Precision:
    """A precision under test: the tower's dtype, and whether fp32 matmuls and convolutions may use TF32."""

    name: str
    dtype: torch.dtype
    tf32: bool


PRECISIONS = (
    Precision("fp32", torch.float32, False),
    Precision("tf32", torch.float32, True),
    Precision("bf16", torch.bfloat16, False),
    Precision("fp16", torch.float16, False),
)


@dataclass(frozen=True)
class Plan:
    """How much to run: the full checker on the GPU, or a tiny one for a check in seconds."""

    size: str
    batches: Tuple[int, ...]
    check_images: int
    warmup: int
    target_s: float
    min_iterations: int


FULL = Plan("full", (1, 8, 32, 128), check_images=128, warmup=3, target_s=1.0, min_iterations=5)
QUICK = Plan("tiny", (1, 2), check_images=4, warmup=1, target_s=0.05, min_iterations=2)


class _SafetyChecker(PreTrainedModel):
    """The modules of diffusers' StableDiffusionSafetyChecker.__init__ (0.42.1), created in the same order."""

    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(17, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(3, config.projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(17), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(3), requires_grad=False)
        # diffusers calls post_init (transformers' weight initialisation) only after 4.57.3.
        if Version(transformers.__version__) > Version("4.57.3"):
            self.post_init()


def build_checker(size: str = "full", seed: int = 0) -> nn.Module:
    """`fixtures.checkers.build_checker(size, seed)` without diffusers: the same tensors."""
    torch.manual_seed(seed)
    checker = _SafetyChecker(clip_config(size)).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.copy_(torch.tensor(THRESHOLDS["concept_embeds_weights"]))
        checker.special_care_embeds_weights.copy_(torch.tensor(THRESHOLDS["special_care_embeds_weights"]))
    return checker


class PrecisionEmbedder(nn.Module):
    """EmbedderGraph's cosines, with its vision tower and projection in `dtype` and the cosines in fp32."""

    def __init__(self, graph: EmbedderGraph, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.vision_model = copy.deepcopy(graph.vision_model).to(dtype)
        self.visual_projection = copy.deepcopy(graph.visual_projection).to(dtype)
        self.register_buffer("concepts", graph.concepts.clone())
        self.register_buffer("special", graph.special.clone())

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.vision_model(pixel_values.to(self.dtype))[1]
        normalized = F.normalize(self.visual_projection(pooled).float())
        return torch.mm(normalized, self.concepts), torch.mm(normalized, self.special)


def gflop_per_image(config: CLIPConfig) -> float:
    """Multiply-adds x 2 of the vision tower, projection and cosines (elementwise work left out).

    Per layer on T tokens of width d with MLP width i: QKV and output projections 8*T*d^2,
    MLP 4*T*d*i, attention scores and mixing 4*T^2*d. ViT-L/14 at 224: about 162 GFLOP.
    """
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens, d, i = patches + 1, vision.hidden_size, vision.intermediate_size
    layer = 8 * tokens * d * d + 4 * tokens * d * i + 4 * tokens * tokens * d
    patch_embedding = 2 * patches * vision.num_channels * vision.patch_size**2 * d
    head = 2 * d * config.projection_dim + 2 * config.projection_dim * 20
    return (vision.num_hidden_layers * layer + patch_embedding + head) / 1e9


def dense_fp16_peak(device_name: str) -> Optional[float]:
    """The table's peak for this device, None when it is not in the table."""
    return next((peak for pattern, peak in DENSE_FP16_PEAK_TFLOPS if re.search(pattern, device_name)), None)


def _unsupported(precision: Precision, device: torch.device) -> Optional[str]:
    """Why a precision cannot run on this device, or None."""
    if device.type != "cuda":
        return "TF32 is a mode of NVIDIA tensor cores; on a CPU it is fp32 again" if precision.tf32 else None
    if precision.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def _set_tf32(enabled: bool) -> None:
    """Both switches: matmuls (off by default) and cuDNN convolutions, the patch embedding (on by default)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _runner(
    model: nn.Module, pixels: torch.Tensor, warmup: int, use_graph: bool
) -> Tuple[Callable[[], Any], Optional[str]]:
    """One forward on the static `pixels`: a captured CUDA graph's replay, or eager and why not a graph."""
    failure = None
    if use_graph:
        try:
            # As torch.cuda.graphs documents: warm up on a side stream, then capture.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    model(pixels)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(pixels)
            return graph.replay, None
        except RuntimeError as error:
            torch.cuda.synchronize()
            failure = _first_line(error)
    for _ in range(warmup):
        model(pixels)
    return (lambda: model(pixels)), failure


def _timed(step: Callable[[], Any], sync: Callable[[], None], plan: Plan) -> Tuple[float, int]:
    """Seconds per call and the number of calls timed: enough calls for about `plan.target_s`."""
    sync()
    start = time.perf_counter()
    step()
    sync()
    once = time.perf_counter() - start
    iterations = max(plan.min_iterations, min(1000, math.ceil(plan.target_s / max(once, 1e-6))))
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync()
    return (time.perf_counter() - start) / iterations, iterations


def _cosines(model: nn.Module, pixels: np.ndarray, device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """Concept and special cosines of `pixels`, eager, in chunks that fit any GPU."""
    parts = [model(torch.from_numpy(pixels[start : start + 32]).to(device)) for start in range(0, len(pixels), 32)]
    return tuple(np.concatenate([part[k].float().cpu().numpy() for part in parts]) for k in (0, 1))


def _agreement(reference: Tuple[np.ndarray, np.ndarray], other: Tuple[np.ndarray, np.ndarray]) -> Dict[str, Any]:
    concept_thresholds = np.array(THRESHOLDS["concept_embeds_weights"], dtype=np.float64)
    special_thresholds = np.array(THRESHOLDS["special_care_embeds_weights"], dtype=np.float64)
    result = stress_agreement(
        reference[0], other[0], concept_thresholds, special_thresholds, spec.SPECIAL_CARE_ADJUSTMENT
    )
    result["max_cosine_deviation"] = max(
        float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(reference, other)
    )
    return result


def run(device: torch.device, plan: Plan, peak_tflops: Optional[float]) -> Dict[str, Any]:
    """Measure every precision at every batch size of `plan`; the report as a JSON-ready dict."""
    started = time.perf_counter()
    on_gpu = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine())
    peak = peak_tflops if peak_tflops is not None else (dense_fp16_peak(device_name) if on_gpu else None)
    gflop = gflop_per_image(clip_config(plan.size))
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    graph = EmbedderGraph(build_checker(plan.size)).eval()
    check_pixels = (
        np.random.default_rng(0)
        .standard_normal((plan.check_images, spec.NUM_CHANNELS, spec.IMAGE_SIZE, spec.IMAGE_SIZE))
        .astype(np.float32)
    )
    skipped: Dict[str, str] = {} if on_gpu else {"cuda_graphs": "CUDA graphs need a CUDA device"}
    throughput: List[Dict[str, Any]] = []
    agreement: Dict[str, Dict[str, Any]] = {}
    reference = None
    for precision in PRECISIONS:
        reason = _unsupported(precision, device)
        if reason:
            skipped[precision.name] = reason
            continue
        if on_gpu:
            _set_tf32(precision.tf32)
        model = None
        try:
            with torch.no_grad():
                model = PrecisionEmbedder(graph, precision.dtype).to(device).eval()
                cosines = _cosines(model, check_pixels, device)
                if reference is None:
                    reference = cosines
                agreement[precision.name] = _agreement(reference, cosines)
                for batch in plan.batches:
                    pixels = torch.randn(batch, spec.NUM_CHANNELS, spec.IMAGE_SIZE, spec.IMAGE_SIZE, device=device)
                    step, graph_failure = _runner(model, pixels, plan.warmup, on_gpu)
                    seconds, iterations = _timed(step, sync, plan)
                    row = {
                        "precision": precision.name,
                        "batch": batch,
                        "images_per_s": round(batch / seconds, 2),
                        "ms_per_batch": round(seconds * 1e3, 3),
                        "iterations": iterations,
                        "peak_fraction": round(batch / seconds * gflop / (peak * 1e3), 4) if peak else "unknown",
                        "cuda_graph": on_gpu and graph_failure is None,
                    }
                    if graph_failure:
                        row["cuda_graph_failure"] = graph_failure
                    throughput.append(row)
                    del step
        except RuntimeError as error:
            if reference is None:
                raise  # fp32 is the reference: without it there is nothing to compare
            skipped[precision.name] = f"failed on {device_name}: {_first_line(error)}"
        del model
        if on_gpu:
            torch.cuda.empty_cache()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_type": device.type,
        "checker": f"{plan.size}, random weights, as fixtures.checkers.build_checker({plan.size!r})",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "gflop_per_image": round(gflop, 3),
        "peak_fp16_dense_tflops": peak if peak else "unknown",
        "check_images": plan.check_images,
        "throughput": throughput,
        "agreement": agreement,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(report: Dict[str, Any]) -> str:
    """The report for people: throughput, then agreement with fp32, then what was skipped and why."""
    peak = report["peak_fp16_dense_tflops"]
    unit = " TFLOP/s" if peak != "unknown" else ""
    lines = [
        f"bench.gpu {report['date']}: {report['device']} ({report['device_type']}), checker {report['checker']}",
        f"{report['gflop_per_image']} GFLOP/image; dense FP16 peak: {peak}{unit}",
        "",
        f"{'precision':<10}{'batch':>6}{'images/s':>12}{'ms/batch':>11}{'FP16 peak':>11}  CUDA graph",
    ]
    for row in report["throughput"]:
        fraction = row["peak_fraction"]
        share = f"{fraction:.1%}" if fraction != "unknown" else fraction
        graph = "yes" if row["cuda_graph"] else "no"
        if "cuda_graph_failure" in row:
            graph += f" ({row['cuda_graph_failure']})"
        lines.append(
            f"{row['precision']:<10}{row['batch']:>6}{row['images_per_s']:>12.1f}{row['ms_per_batch']:>11.3f}"
            f"{share:>11}  {graph}"
        )
    lines += [
        "",
        f"agreement with fp32 at the stress margins ({report['check_images']} images):",
        f"{'precision':<10}{'decisions':>10}{'scores':>9}{'max score dev':>15}{'max |cos dev|':>15}{'cases':>8}",
    ]
    for name, result in report["agreement"].items():
        lines.append(
            f"{name:<10}{result['decision_agreement']:>10.4f}{result['score_agreement']:>9.4f}"
            f"{result['max_score_deviation']:>15.3f}{result['max_cosine_deviation']:>15.2e}{result['cases']:>8}"
        )
    lines += [f"skipped {what}: {why}" for what, why in report["skipped"].items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny checker, batches 1 and 2, few iterations")
    parser.add_argument("--peak-tflops", type=float, help="dense FP16 peak of the device, overriding the table")
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu")
    report = run(device, QUICK if args.quick else FULL, args.peak_tflops)
    print(table(report), flush=True)
    line = json.dumps(report)
    if args.output:
        args.output.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
