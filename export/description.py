"""The vocabulary of a served model's description: what `export.configs` renders into config.pbtxt.

Like TensorRT's demo/Diffusion, which keeps one description per network, each
model of the repository is described once (`export.models`,
`export.ensembles`) in these terms: its name, tensors (from the client's
`spec`, the served contract), its config variants with their backend,
instances, batching and parameters, and, for an ensemble, its steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from safety_checker_client import spec
from safety_checker_client.spec import TensorSpec

# Where the committed model folders (config.pbtxt, 1/model.py) live.
SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"

# The names given to --model-config-name: configs/cpu.pbtxt (the bundled CPU
# server) and configs/fast.pbtxt (TensorRT FP16 on a GPU, opt-in).
CPU_CONFIG_NAME = "cpu"
FAST_CONFIG_NAME = "fast"

# Two priority levels: 1 for the health probe (model_repository/health_probe.py), which so waits for at most
# the batch that is running, never behind the queue; 2, the default, for every other request.
PRIORITY_LEVELS = 2
DEFAULT_PRIORITY_LEVEL = 2


@dataclass(frozen=True)
class Parameter:
    """A config `parameters` entry (always a string_value, as Triton passes them to Python models)."""

    key: str
    value: str
    comment: str = ""


@dataclass(frozen=True)
class DynamicBatching:
    """Dynamic batching and its queue policy: at most `max_queue_size` waiting requests, each refused with
    UNAVAILABLE once it waited `queue_timeout_us` (a request's own "timeout" parameter may only shorten it)."""

    max_queue_delay_us: int
    max_queue_size: int
    queue_timeout_us: int
    preferred_batch_sizes: Tuple[int, ...] = ()
    priority_levels: int = PRIORITY_LEVELS
    default_priority_level: int = DEFAULT_PRIORITY_LEVEL
    comment: str = ""


def queue_comment(max_queue_size: int, timeout_us: int) -> str:
    return f"""At most {max_queue_size} requests wait (each up to {spec.MAX_BATCH_SIZE} images); one that waited
{timeout_us // 1_000_000} s is refused with UNAVAILABLE. Priority 1 (the health probe) goes first."""


def queue(max_queue_delay_us: int, max_queue_size: int, timeout_us: int, comment: Optional[str] = None):
    """Dynamic batching with a bounded queue; the comment says so unless one is given."""
    if comment is None:
        comment = queue_comment(max_queue_size, timeout_us)
    return DynamicBatching(max_queue_delay_us, max_queue_size, timeout_us, comment=comment)


@dataclass(frozen=True)
class Accelerator:
    """An onnxruntime execution accelerator on the GPU ("tensorrt" or "cuda") and its parameters."""

    name: str
    parameters: Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class Variant:
    """One config file of a model: config.pbtxt (what the NGC container loads) or configs/NAME.pbtxt."""

    backend: str  # "python", "onnxruntime", or "ensemble" (rendered as its platform)
    comment: str
    config_name: Optional[str] = None  # None: config.pbtxt; NAME: configs/NAME.pbtxt
    instance_kind: Optional[str] = None  # KIND_CPU / KIND_GPU; None for ensembles
    instance_count: int = 1
    batching: Optional[DynamicBatching] = None
    parameters: Tuple[Parameter, ...] = ()
    default_model_filename: Optional[str] = None
    accelerator: Optional[Accelerator] = None
    warmup_batch: Optional[int] = None  # a zero batch of this size at load
    comment_instances: str = ""

    @property
    def path(self) -> Path:
        return Path("config.pbtxt") if self.config_name is None else Path("configs", f"{self.config_name}.pbtxt")


@dataclass(frozen=True)
class Step:
    """One model of an ensemble; every tensor keeps its own name, which spec keeps unique, unless `renamed`
    gives the ensemble's name for one of the model's tensors (the images ensemble's per-view answers)."""

    model: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    comment: str
    renamed: Tuple[Tuple[str, str], ...] = ()  # (the model's tensor, the ensemble's tensor)


@dataclass(frozen=True)
class ServedModel:
    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    variants: Tuple[Variant, ...]
    steps: Tuple[Step, ...] = ()  # ensembles only
    # Requirements its Python variants import besides this project's packages (installed into its environment).
    requirements: Tuple[str, ...] = ()
    max_batch_size: int = spec.MAX_BATCH_SIZE

    @property
    def python(self) -> bool:
        """Whether a config of this model runs on the Python backend (and so needs the packed environment)."""
        return any(variant.backend == "python" for variant in self.variants)
