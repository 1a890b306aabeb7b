"""One in-process candidate in its own process: diffusers' forward(), an onnxruntime session, or the decoder.

Each candidate gets a process of its own so that its threads, memory and
warm caches never mix with the load generator's or another candidate's. The
orchestrator talks to it over stdin/stdout, one JSON line per measurement
window, so candidates can be interleaved window by window.

    python -m bench.worker diffusers CHECKPOINT_DIR PIXELS.npy
    python -m bench.worker onnxruntime MODEL.onnx PIXELS.npy
    python -m bench.worker decoder DECODER_CONFIG.pbtxt IMAGE_FILE

The decoder is safety_checker_decode's own decoding
(safety_checker_served.decoding, with the client's preprocessing) under the
limits of the given config, one file per call on one thread: what one
instance of the model decodes per second.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np


def _diffusers(checkpoint: str) -> Callable[[np.ndarray], None]:
    """The baseline as users run it today: the pipeline's own safety checker, fp32, PyTorch defaults."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    checker = StableDiffusionSafetyChecker.from_pretrained(checkpoint).eval()

    def run(pixels: np.ndarray) -> None:
        images = np.zeros((len(pixels), 8, 8, 3), dtype=np.float32)  # forward() blacks out flagged images
        with torch.no_grad():
            checker(images=images, clip_input=torch.from_numpy(pixels))

    return run


def _served_parameters(model: Path) -> Dict[str, str]:
    """The `parameters` of the CPU config serving this model.onnx (version folder's parent)."""
    return _config_parameters(model.parent.parent / "configs" / "cpu.pbtxt")


def _onnxruntime(model: str) -> Callable[[np.ndarray], None]:
    """The exported graph with the session options of the served CPU embedder, so the
    two differ only by what serving adds."""
    from safety_checker_served.session import onnx_session

    session = onnx_session(model, _served_parameters(Path(model)))

    def run(pixels: np.ndarray) -> None:
        session.run(None, {"pixel_values": pixels})

    return run


def _decoder(config_file: str) -> Callable[[np.ndarray], None]:
    """safety_checker_decode's decoding, as one of its instances runs it (Triton's transfers aside)."""
    from safety_checker_served import decoding

    limits = decoding.limits_from(_config_parameters(Path(config_file)))
    decoding.set_pillow_limit(limits)

    def run(files: np.ndarray) -> None:
        decoding.decode(list(files), limits)

    return run


def _config_parameters(config_file: Path) -> Dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_file.read_text(), model_config_pb2.ModelConfig())
    return {key: value.string_value for key, value in config.parameters.items()}


CANDIDATES = {"diffusers": _diffusers, "onnxruntime": _onnxruntime, "decoder": _decoder}


def window(run: Callable[[np.ndarray], None], pixels: np.ndarray, window_s: float) -> Dict[str, object]:
    """Call `run` back to back until `window_s` has passed; every call counts, so nothing is cut."""
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < window_s:
        sent = time.perf_counter()
        run(pixels)
        latencies.append((time.perf_counter() - sent) * 1e3)
    seconds = time.perf_counter() - start
    return {
        "calls": len(latencies),
        "images": len(latencies) * len(pixels),
        "seconds": seconds,
        "latencies_ms": latencies,
    }


def main() -> int:
    kind, model, pixels_file = sys.argv[1:4]
    if kind == "decoder":  # one encoded file, as a batch of one
        pixels = np.array([Path(pixels_file).read_bytes()], dtype=object)
    else:
        pixels = np.load(pixels_file)
    run = CANDIDATES[kind](model)
    run(pixels[:1])  # first-call allocations and graph preparation
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        batch = pixels[: command["batch"]]
        run(batch)  # warm the caches for this batch size
        print(json.dumps(window(run, batch, command["window_s"])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
