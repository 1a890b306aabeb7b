"""The machine a benchmark ran on, as results.json records it: CPU, cores, SIMD flags, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def machine() -> Dict[str, Any]:
    import onnxruntime
    import torch

    model = platform.processor()
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
    present = set(flags.split(":", 1)[-1].split())
    simd = [name for name in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if name in present]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = f"{model}, {cores} cores ({', '.join(simd) or 'no AVX2'}), CPU only"
    return {
        "description": description,
        "cpu": model,
        "cores": cores,
        "simd": simd,
        # What int8 and fp32 matrix products can use: VNNI (avx512_vnni, avx_vnni) and AMX do int8 dot products.
        "cpu_flags": [name for name in CPU_FLAGS if name in present],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "triton": "2.51 (nvidia-pytriton 0.7.0)",
    }
