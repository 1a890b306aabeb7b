"""One description per served model: the single source of every config.pbtxt and of each version folder.

Like TensorRT's demo/Diffusion, which keeps one description per network, each
model of the repository is described here once: its name, backend, tensors
(from the client's `spec`, the served contract), batching, parameters and the
Python files its version folder needs. `export.configs` renders every
config.pbtxt from these descriptions, and `export.repository` copies the
listed files; nothing about a served model is written anywhere else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import safety_checker_admin.concept_set
import safety_checker_client.preprocess
from export.served import SOURCE_REPOSITORY
from safety_checker_client import spec
from safety_checker_client.spec import TensorSpec

# The homes of the files the export copies into other models' version folders.
ONNX_RUNNER = (
    SOURCE_REPOSITORY / spec.EMBEDDER_MODEL / "1" / "model.py",
    SOURCE_REPOSITORY / spec.EMBEDDER_MODEL / "1" / "session.py",
    SOURCE_REPOSITORY / spec.EMBEDDER_MODEL / "1" / "request_limits.py",
)
# What every Python model refuses (unknown request parameters, ...); its home is the embedder's version folder.
REQUEST_LIMITS_MODULE = ONNX_RUNNER[2]
CONCEPT_SET_MODULE = Path(safety_checker_admin.concept_set.__file__).resolve()
# The client's preprocessing and the contract it imports, which the images model decodes files with; and the
# postprocessor's reading of the strictness request parameters, which it checks requests with.
CLIENT_PREPROCESSING = (
    Path(safety_checker_client.preprocess.__file__).resolve(),
    Path(spec.__file__).resolve(),
)
STRICTNESS_MODULE = SOURCE_REPOSITORY / spec.POSTPROCESS_MODEL / "1" / "strictness.py"

# The names given to --model-config-name: configs/cpu.pbtxt (the bundled CPU
# server) and configs/fast.pbtxt (TensorRT FP16 on a GPU, opt-in).
CPU_CONFIG_NAME = "cpu"
FAST_CONFIG_NAME = "fast"

# GPU: two instances, so that one batch's copies and batch formation overlap the other's compute.
GPU_INSTANCES = 2
# TensorRT engine profile and cache (fast configuration).
GPU_OPT_BATCH = 16
GPU_WORKSPACE_BYTES = 4 << 30
GPU_ENGINE_CACHE = "/trt-cache"
# The engine cache prefix of the committed reference configs; the export writes model.onnx's digest.
REFERENCE_ENGINE_KEY = "not-exported"

# The images model's CPU instances, which decode files: one per core of the host the export runs on, unless
# the export is told (--decoder-instances). The committed reference configs show this many.
REFERENCE_DECODER_INSTANCES = 4
# GPU configuration: an instance waits for the GPU after each decode, so twice as many keep the cores busy.
GPU_DECODERS_PER_CORE = 2


def host_decoder_instances() -> int:
    """One decoder per core this process may run on: the export's default --decoder-instances."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


# Dynamic batching: how long a request may wait for others to fill a batch.
GPU_QUEUE_DELAY_US = 2000
CPU_QUEUE_DELAY_US = 0
POSTPROCESS_QUEUE_DELAY_US = 500

# Overload: every model's queue is bounded, in requests (Triton counts requests, not images), and a request
# that waited longer than its model's timeout is refused with UNAVAILABLE instead of piling up. A refused
# request costs the server nothing more; the client retries it with backoff (client.py). Each queued
# request holds its tensors: up to max_batch_size images (19 MB of float32 pixel_values).
GPU_MAX_QUEUE = 64  # two full batches of single-image requests per instance
GPU_QUEUE_TIMEOUT_US = 5_000_000
# Sixteen: a batch job keeps up to 16 single-image requests in flight without a refusal (a queue of
# four refused eight single-image clients: the soak in docs/robustness.md); sixteen 32-image requests
# are 308 MB of pixel_values, and the timeout refuses whatever would wait longer than it.
CPU_MAX_QUEUE = 16
CPU_QUEUE_TIMEOUT_US = 30_000_000  # the full ViT-L/14 on two cores: about a second per image
IMAGES_MAX_QUEUE = 8  # requests of encoded files: eight clients beside the decoders' own
POSTPROCESS_MAX_QUEUE = 128  # a few KB per image: room for four embedder batches of single-image requests
POSTPROCESS_QUEUE_TIMEOUT_US = 10_000_000
# Two priority levels: 1 for the health probe (admin/safety_checker_admin/health_probe.py), which so waits for
# at most the batch that is running, never behind the queue; 2, the default, for every other request.
PRIORITY_LEVELS = 2
DEFAULT_PRIORITY_LEVEL = 2

# Request parameters. The checker's own (spec) are the only ones a request may carry, besides Triton's reserved
# keys: Triton 2.51's HTTP and gRPC front ends consume these themselves (src/http_server.cc
# ParseJsonTritonParams, src/grpc/infer_handler.cc SetInferenceRequestMetadata), except binary_data_output,
# which gRPC passes on to the model. Every other name is refused with INVALID_ARG by each Python model, and the
# ensembles forward every parameter of a request to each of their steps.
REQUEST_PARAMETERS = (spec.STRICTNESS_PARAMETER, spec.STRICTNESS_ADJUSTMENT_PARAMETER)
TRITON_REQUEST_PARAMETERS = (
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "binary_data_output",
    "triton_enable_empty_final_response",
)
# The JSON text of one request's parameters, at most (the longest valid one is a few dozen bytes).
MAX_PARAMETER_BYTES = 1024


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
    """One model of an ensemble; every tensor keeps its own name, which spec keeps unique."""

    model: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    comment: str


@dataclass(frozen=True)
class ServedModel:
    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    variants: Tuple[Variant, ...]
    steps: Tuple[Step, ...] = ()  # ensembles only
    # Python files whose home is elsewhere, copied into the version folder by the export.
    copied_files: Tuple[Path, ...] = ()
    max_batch_size: int = spec.MAX_BATCH_SIZE


def _required(tensors: Tuple[TensorSpec, ...]) -> Tuple[TensorSpec, ...]:
    """The tensors an ensemble step must map: an optional input stays unmapped."""
    return tuple(t for t in tensors if not t.optional)


_EMBED = Step(
    spec.EMBEDDER_MODEL,
    spec.EMBEDDER_INPUTS,
    spec.EMBEDDER_OUTPUTS,
    "ONNX graph: CLIP vision tower, projection, cosines to the concepts.",
)
_POSTPROCESS = Step(
    spec.POSTPROCESS_MODEL,
    _required(spec.POSTPROCESS_INPUTS),
    tuple(t for t in spec.POSTPROCESS_OUTPUTS if t in spec.ENSEMBLE_OUTPUTS),
    "Python: thresholds, rounding and the special-care rule, as diffusers.",
)
_NORMALIZE = Step(
    spec.NORMALIZE_MODEL,
    spec.NORMALIZE_INPUTS,
    spec.NORMALIZE_OUTPUTS,
    "ONNX lookup table: rescale and normalise, exactly as CLIPImageProcessor.",
)
_CASCADE = Step(
    spec.CASCADE_MODEL,
    spec.ENSEMBLE_INPUTS,
    spec.ENSEMBLE_OUTPUTS,
    "Python (BLS): int8 embedder, fp32 where int8 could decide otherwise, postprocessor.",
)


def ensemble(cascade: bool = False) -> ServedModel:
    """The public contract; in a cascade repository its one step is the cascade."""
    how = "\nHere the int8/fp32 cascade answers (python -m export --cascade)." if cascade else ""
    return ServedModel(
        spec.ENSEMBLE_MODEL,
        spec.ENSEMBLE_INPUTS,
        spec.ENSEMBLE_OUTPUTS,
        steps=(_CASCADE,) if cascade else (_EMBED, _POSTPROCESS),
        variants=(
            Variant(
                "ensemble",
                f"""The guardrail's public contract: CLIP pixel_values in, per image the
decision diffusers' StableDiffusionSafetyChecker.forward() takes, the rounded
per-concept scores behind it and the projected image embedding.{how}""",
            ),
        ),
    )


def uint8_ensemble(cascade: bool = False) -> ServedModel:
    return ServedModel(
        spec.UINT8_ENSEMBLE_MODEL,
        spec.UINT8_ENSEMBLE_INPUTS,
        spec.UINT8_ENSEMBLE_OUTPUTS,
        steps=(_NORMALIZE, _CASCADE) if cascade else (_NORMALIZE, _EMBED, _POSTPROCESS),
        variants=(
            Variant(
                "ensemble",
                f"""The same checker for clients that send resized and cropped uint8
RGB images (150 KB per image instead of 602 KB of float32 pixel_values);
the server normalises them. Same outputs and decisions as "{spec.ENSEMBLE_MODEL}".""",
            ),
        ),
    )


_ONNX_FILE = Parameter(
    "onnx_filename", spec.ONNX_FILENAME, "The ONNX file in the version folder, shared with the onnxruntime backend."
)

# onnxruntime's CPU memory arena keeps the memory of the largest batch it ran for as long as the server runs
# (measured: 175 MB of the tiny test checker after 32-image batches); off, activations go back after each run.
_NO_ARENA = Parameter(
    "cpu_mem_arena",
    "0",
    "0: onnxruntime allocates each run's activations and hands them back (no arena that only grows).",
)

# What every Python model refuses, read from its config (model_repository/*/1/model.py).
REQUEST_LIMITS = (
    Parameter(
        "request_parameters",
        ",".join(REQUEST_PARAMETERS),
        """The request parameters a request may carry (the ensembles forward a request's parameters to
every step); any other name is refused with INVALID_ARG, naming it and these.""",
    ),
    Parameter(
        "triton_request_parameters",
        ",".join(TRITON_REQUEST_PARAMETERS),
        """Triton's reserved request parameters, accepted too: its HTTP and gRPC front ends consume them
(binary_data_output reaches a model over gRPC).""",
    ),
    Parameter(
        "max_request_images",
        str(spec.MAX_BATCH_SIZE),
        "Largest batch one request may hold, and the longest JSON text of its parameters, in bytes.",
    ),
    Parameter("max_parameter_bytes", str(MAX_PARAMETER_BYTES)),
)


def _queue_comment(max_queue_size: int, timeout_us: int) -> str:
    return f"""At most {max_queue_size} requests wait (each up to {spec.MAX_BATCH_SIZE} images); one that waited
{timeout_us // 1_000_000} s is refused with UNAVAILABLE. Priority 1 (the health probe) goes first."""


def _queue(max_queue_delay_us: int, max_queue_size: int, timeout_us: int, comment: str = "") -> DynamicBatching:
    return DynamicBatching(max_queue_delay_us, max_queue_size, timeout_us, comment=comment)


_NO_DELAY_GPU = _queue(
    0,
    GPU_MAX_QUEUE,
    GPU_QUEUE_TIMEOUT_US,
    """No queue delay: each request goes straight on to the embedder, which batches.
Dynamic batching is here for its bounded queue (see the embedder).""",
)
_CPU_QUEUE = _queue(CPU_QUEUE_DELAY_US, CPU_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US)

NORMALIZE = ServedModel(
    spec.NORMALIZE_MODEL,
    spec.NORMALIZE_INPUTS,
    spec.NORMALIZE_OUTPUTS,
    copied_files=ONNX_RUNNER,
    variants=(
        Variant(
            "onnxruntime",
            f"""uint8 images -> pixel_values on the GPU with the onnxruntime backend.
configs/{CPU_CONFIG_NAME}.pbtxt runs the same model.onnx on CPU.""",
            instance_kind="KIND_GPU",
            default_model_filename=spec.ONNX_FILENAME,
            batching=_NO_DELAY_GPU,
        ),
        Variant(
            "python",
            """uint8 images -> pixel_values on CPU: the embedder's Python onnxruntime
runner (1/model.py, copied by the export) on this folder's model.onnx, a
table lookup that takes about a millisecond per image on one thread.""",
            config_name=CPU_CONFIG_NAME,
            instance_kind="KIND_CPU",
            batching=_CPU_QUEUE,
            parameters=(_ONNX_FILE, Parameter("intra_op_num_threads", "1"), _NO_ARENA, *REQUEST_LIMITS),
        ),
    ),
)


def _profile_shape(batch: int) -> str:
    pixels = spec.PIXEL_VALUES
    return f"{pixels.name}:" + "x".join(str(d) for d in (batch, *pixels.dims))


def embedder(engine_cache_key: str = REFERENCE_ENGINE_KEY, name: str = spec.EMBEDDER_MODEL) -> ServedModel:
    """The embedder; `engine_cache_key` (model.onnx's digest) keeps TensorRT engines of different exports apart.
    `name`: the cascade's int8 embedder is the same description under its own name, with the runner copied in."""
    batching = _queue(
        GPU_QUEUE_DELAY_US,
        GPU_MAX_QUEUE,
        GPU_QUEUE_TIMEOUT_US,
        comment=f"""A GPU computes a batch faster per image than single images: wait up to
{GPU_QUEUE_DELAY_US} us for requests to form one (up to max_batch_size; no preferred
sizes, since none was measured to be faster). At most {GPU_MAX_QUEUE} requests wait; one that
waited {GPU_QUEUE_TIMEOUT_US // 1_000_000} s is refused with UNAVAILABLE. Priority 1 (the health probe) goes first.""",
    )
    instances = f"""{GPU_INSTANCES} instances on the GPU: while one runs a batch, the other's batch is
formed and copied."""
    return ServedModel(
        name,
        spec.EMBEDDER_INPUTS,
        spec.EMBEDDER_OUTPUTS,
        copied_files=() if name == spec.EMBEDDER_MODEL else ONNX_RUNNER,
        variants=(
            Variant(
                "onnxruntime",
                f"""Embedder on a GPU with Triton's onnxruntime backend (NGC container): the
default config, exact. The CUDA provider runs the graph in fp32 with TF32
off (onnxruntime enables TF32 by default, which rounds matmul inputs to 10
mantissa bits on Ampere and later), so decisions are those of the CPU path
and of diffusers' fp32 forward(). configs/{FAST_CONFIG_NAME}.pbtxt (TensorRT FP16) is
faster and not exact; configs/{CPU_CONFIG_NAME}.pbtxt serves the same model.onnx on CPU.""",
                instance_kind="KIND_GPU",
                instance_count=GPU_INSTANCES,
                comment_instances=instances,
                default_model_filename=spec.ONNX_FILENAME,
                batching=batching,
                accelerator=Accelerator("cuda", (("use_tf32", "0"),)),
                warmup_batch=spec.MAX_BATCH_SIZE,
            ),
            Variant(
                "onnxruntime",
                f"""Embedder on a GPU with TensorRT in FP16 (--model-config-name={FAST_CONFIG_NAME}):
fast, and NOT exact. FP16 moves cosines, so a score next to a threshold can round
the other way than diffusers' fp32; how far has not been measured on
TensorRT (docs/gpu.md). Each LayerNorm's variance stays in fp32
(trt_layer_norm_fp32_fallback, on the export's decomposed LayerNorms).
With explicit profiles onnxruntime builds the engine (batch
1..{spec.MAX_BATCH_SIZE}, tuned for {GPU_OPT_BATCH}) when the session is created, before the model
reports ready: minutes on the first start. Engines are cached in
{GPU_ENGINE_CACHE} (a volume) under a prefix that is model.onnx's digest, because
onnxruntime's cache key does not hash the weights: a re-exported checker of
the same architecture gets its own engine instead of the old one.""",
                config_name=FAST_CONFIG_NAME,
                instance_kind="KIND_GPU",
                instance_count=GPU_INSTANCES,
                comment_instances=instances,
                default_model_filename=spec.ONNX_FILENAME,
                batching=batching,
                accelerator=Accelerator(
                    "tensorrt",
                    (
                        ("precision_mode", "FP16"),
                        # Keeps each LayerNorm's variance (Pow -> ReduceMean, as the export decomposes it) in fp32.
                        ("trt_layer_norm_fp32_fallback", "1"),
                        ("max_workspace_size_bytes", str(GPU_WORKSPACE_BYTES)),
                        ("trt_engine_cache_enable", "1"),
                        ("trt_engine_cache_path", GPU_ENGINE_CACHE),
                        ("trt_engine_cache_prefix", f"checker_{engine_cache_key}"),
                        ("trt_timing_cache_enable", "1"),
                        ("trt_timing_cache_path", GPU_ENGINE_CACHE),
                        ("trt_profile_min_shapes", _profile_shape(1)),
                        ("trt_profile_opt_shapes", _profile_shape(GPU_OPT_BATCH)),
                        ("trt_profile_max_shapes", _profile_shape(spec.MAX_BATCH_SIZE)),
                    ),
                ),
                warmup_batch=spec.MAX_BATCH_SIZE,
            ),
            Variant(
                "python",
                f"""Embedder on CPU: a Python-backend model running the same model.onnx with
onnxruntime (the bundled tritonserver has no onnxruntime backend).
Selected with --model-config-name={CPU_CONFIG_NAME}.""",
                config_name=CPU_CONFIG_NAME,
                instance_kind="KIND_CPU",
                comment_instances="""Tuned with `make bench` on a 2-core AVX2 machine (docs/benchmarks.md): one
instance, because onnxruntime already keeps every core busy on one image and
two single-thread instances were no faster; and no queue delay, because on a
CPU a bigger batch does not make an image cheaper. Requests that arrive while
a batch runs (about a second per image) still go together into the next one;
a request that finds the model idle starts at once.""",
                batching=_queue(
                    CPU_QUEUE_DELAY_US,
                    CPU_MAX_QUEUE,
                    CPU_QUEUE_TIMEOUT_US,
                    comment=_queue_comment(CPU_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US),
                ),
                parameters=(
                    _ONNX_FILE,
                    Parameter(
                        "intra_op_num_threads",
                        "0",
                        """onnxruntime intra-op threads; 0 lets it use all physical cores. Any
onnxruntime session config entry ("session.*") may be added the same way.""",
                    ),
                    Parameter(
                        "session.intra_op.allow_spinning",
                        "0",
                        """0: idle intra-op threads sleep instead of spinning. Spinning threads took
the cores from the Python stubs and the gRPC front end between runs (tiny
checker through the cascade at concurrency 4: 12.8 -> 53.7 images/s, with
perf_analyzer on a 2-core machine).""",
                    ),
                    _NO_ARENA,
                    *REQUEST_LIMITS,
                ),
                warmup_batch=1,
            ),
        ),
    )


# How requests choose a strictness: read by the postprocessor, checked by the images model (strictness.py).
_STRICTNESS_PARAMETERS = (
    Parameter(
        "strictness_presets",
        json.dumps(spec.STRICTNESS_PRESETS),
        'Adjustment added to every score before the "> 0" test (diffusers PR #9068).',
    ),
    Parameter(
        "max_strictness_adjustment",
        f"{spec.MAX_STRICTNESS_ADJUSTMENT:g}",
        "Largest |strictness_adjustment| a request may ask for.",
    ),
    Parameter(
        "strictness_parameter",
        spec.STRICTNESS_PARAMETER,
        "The request parameters that choose a preset or an adjustment.",
    ),
    Parameter("strictness_adjustment_parameter", spec.STRICTNESS_ADJUSTMENT_PARAMETER),
)


def postprocess(
    strictness: str = spec.DEFAULT_STRICTNESS, concepts_dir: str = "", cosine_bound: float = 0.0
) -> ServedModel:
    """The postprocessor with the server's default strictness preset (the export's --strictness), the folder of
    its custom concept set ("": its version folder; the export's --concepts-dir) and the error bound of the
    embedder in front of it (0: fp32; an --int8 export's measured bound)."""

    if strictness not in spec.STRICTNESS_PRESETS:
        raise ValueError(f"unknown strictness preset {strictness!r} (one of {', '.join(spec.STRICTNESS_PRESETS)})")
    return ServedModel(
        spec.POSTPROCESS_MODEL,
        spec.POSTPROCESS_INPUTS,
        spec.POSTPROCESS_OUTPUTS,
        copied_files=(CONCEPT_SET_MODULE, REQUEST_LIMITS_MODULE),
        variants=(
            Variant(
                "python",
                f"""Thresholds, rounding and the special-care rule of diffusers'
StableDiffusionSafetyChecker.forward(), vectorised over every request of a
batch. Thresholds are read from 1/{spec.CONCEPTS_FILENAME}, written by the export;
custom concepts from 1/{spec.CUSTOM_CONCEPTS_FILENAME}, re-read whenever it changes.
Inputs and outputs are read by position, in the order declared here.""",
                instance_kind="KIND_CPU",
                batching=_queue(
                    POSTPROCESS_QUEUE_DELAY_US,
                    POSTPROCESS_MAX_QUEUE,
                    POSTPROCESS_QUEUE_TIMEOUT_US,
                    comment=_queue_comment(POSTPROCESS_MAX_QUEUE, POSTPROCESS_QUEUE_TIMEOUT_US),
                ),
                parameters=(
                    Parameter(
                        spec.STRICTNESS_CONFIG_KEY,
                        strictness,
                        f"""The strictness preset every request gets unless it
sends the request parameter "{spec.STRICTNESS_PARAMETER}" (a preset) or
"{spec.STRICTNESS_ADJUSTMENT_PARAMETER}" (a number). "{spec.DEFAULT_STRICTNESS}" reproduces the reference
checker exactly.""",
                    ),
                    *_STRICTNESS_PARAMETERS,
                    *REQUEST_LIMITS,
                    Parameter(
                        "concepts_file",
                        spec.CONCEPTS_FILENAME,
                        "Files in the version folder: the built-in thresholds, the operator's concepts.",
                    ),
                    Parameter("custom_concepts_file", spec.CUSTOM_CONCEPTS_FILENAME),
                    Parameter(
                        "cosine_bound",
                        repr(float(cosine_bound)),
                        f"""The largest |cosine| error of the embedder in front (0: fp32, exact), unless a
request sends the input "{spec.COSINE_BOUND.name}". An image whose every margin lies farther than
it from its rounding boundary keeps its decision: exact_scores says which.""",
                    ),
                    Parameter(
                        "custom_concepts_dir",
                        concepts_dir,
                        """Where custom_concepts_file is read: empty for the version folder, or a
folder every replica shares (a ConfigMap volume), re-read when it changes.""",
                    ),
                ),
            ),
        ),
    )


def images(decoder_instances: int = REFERENCE_DECODER_INSTANCES) -> ServedModel:
    """The checker fed encoded image files, with `decoder_instances` CPU instances (per core: --decoder-instances)."""
    if decoder_instances < 1:
        raise ValueError(f"decoder instances must be at least 1, not {decoder_instances}")
    parameters = (
        Parameter(
            "max_encoded_bytes",
            str(spec.MAX_ENCODED_BYTES),
            """Largest image file per element, in bytes (20 MiB), raw or as what its base64
text decodes to; a larger one refuses the request.""",
        ),
        Parameter(
            "max_pixels",
            str(spec.MAX_IMAGE_PIXELS),
            """Largest width x height per image, read from the file's header before any
pixel is decoded: a decompression bomb is refused without decoding it.""",
        ),
        Parameter(
            "formats",
            ",".join(spec.IMAGE_FORMATS),
            "The formats decoded (Pillow's names); anything else (SVG, PDF, ...) is refused.",
        ),
        Parameter(
            "checker_model",
            spec.ENSEMBLE_MODEL,
            "The model the decoded pixels go to (through BLS), and its pixel input.",
        ),
        Parameter("checker_input", spec.PIXEL_VALUES.name),
        *_STRICTNESS_PARAMETERS,
        *REQUEST_LIMITS,
    )
    about = f"""The checker fed image files: each element is one PNG, JPEG, WebP, GIF, BMP
or TIFF file, its raw bytes or their base64 text (told apart by content),
decoded with the client's own preprocessing (1/preprocess.py, copied by the
export), checked by "{spec.ENSEMBLE_MODEL}" through BLS, and answered with its
outputs in this config's order, has_nsfw_concepts first (an ensemble would
answer JSON requests in a hash map's order). One element that cannot be
checked refuses the whole request with INVALID_ARG naming its index."""
    # No batching delay (each request is decoded and checked on its own); the queue is what is bounded: fewer
    # requests than the embedder's, since each may carry 32 files of up to 20 MiB.
    images_queue = _queue(
        0, IMAGES_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US, comment=_queue_comment(IMAGES_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US)
    )
    return ServedModel(
        spec.IMAGES_MODEL,
        spec.IMAGES_INPUTS,
        spec.IMAGES_OUTPUTS,
        copied_files=(*CLIENT_PREPROCESSING, STRICTNESS_MODULE, REQUEST_LIMITS_MODULE),
        variants=(
            Variant(
                "python",
                about,
                instance_kind="KIND_CPU",
                instance_count=GPU_DECODERS_PER_CORE * decoder_instances,
                comment_instances=f"""Decoding is CPU work: CPU instances on a GPU host too,
{GPU_DECODERS_PER_CORE} per core ({decoder_instances} cores, rendered by the export: --decoder-instances,
default the cores of the host it runs on), because each waits for the GPU's
answer after decoding its request.""",
                batching=images_queue,
                parameters=parameters,
            ),
            Variant(
                "python",
                about,
                config_name=CPU_CONFIG_NAME,
                instance_kind="KIND_CPU",
                instance_count=decoder_instances,
                comment_instances=f"""One instance per core ({decoder_instances}, rendered by the export:
--decoder-instances, default one per core of the host it runs on). Each holds
its request until the embedder answered, and the embedder needs the cores.""",
                batching=images_queue,
                parameters=parameters,
            ),
        ),
    )


@dataclass(frozen=True)
class Settings:
    """What one export chooses for its served models; the defaults render the committed reference configs."""

    strictness: str = spec.DEFAULT_STRICTNESS  # the server's default preset (--strictness)
    engine_cache_key: str = REFERENCE_ENGINE_KEY  # model.onnx's digest: the TensorRT engine cache prefix
    concepts_dir: str = ""  # where the custom concept set is read (--concepts-dir); "": the version folder
    # The int8 embedder's error bound: of the served embedder (--int8), or of the cascade's int8 one (--cascade).
    cosine_bound: float = 0.0
    cascade: bool = False
    int8_engine_cache_key: str = REFERENCE_ENGINE_KEY
    decoder_instances: int = REFERENCE_DECODER_INSTANCES  # the images model's decoders (--decoder-instances)


# What the committed model_repository/ configs are rendered with.
REFERENCE_SETTINGS = Settings()


def cascade(cosine_bound: float = 0.0) -> ServedModel:
    """The int8/fp32 cascade (BLS), answering for the ensembles of a --cascade repository."""
    names = ",".join(t.name for t in spec.EMBEDDER_OUTPUTS)
    return ServedModel(
        spec.CASCADE_MODEL,
        spec.ENSEMBLE_INPUTS,
        spec.ENSEMBLE_OUTPUTS,
        copied_files=(REQUEST_LIMITS_MODULE,),
        variants=(
            Variant(
                "python",
                """The int8/fp32 cascade (python -m export --cascade): every image goes
through the int8 embedder; the postprocessor scores it and says, with the
int8 error bound below, whether int8 could have changed its decision
(built-in, special-care and custom concepts, rounding and the special-care
rule included). Those images go through the fp32 embedder and are scored
again, exactly. Decisions are the fp32 checker's; exact_scores says which
answers are fp32's own.""",
                instance_kind="KIND_CPU",
                batching=_queue(
                    0,
                    POSTPROCESS_MAX_QUEUE,
                    CPU_QUEUE_TIMEOUT_US,
                    comment=_queue_comment(POSTPROCESS_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US),
                ),
                parameters=(
                    *REQUEST_LIMITS,
                    Parameter(
                        "cosine_bound",
                        repr(float(cosine_bound)),
                        "The int8 embedder's error bound, as measured by the export (cascade.json).",
                    ),
                    Parameter("int8_embedder", spec.INT8_EMBEDDER_MODEL),
                    Parameter("fp32_embedder", spec.EMBEDDER_MODEL),
                    Parameter("postprocessor", spec.POSTPROCESS_MODEL),
                    Parameter(
                        "embedder_outputs",
                        names,
                        "Tensors the embedders give and the postprocessor takes, by name.",
                    ),
                    Parameter("cosine_bound_input", spec.COSINE_BOUND.name),
                    Parameter("decision_certain_output", spec.DECISION_CERTAIN.name),
                ),
            ),
        ),
    )


def served_models(settings: Settings = REFERENCE_SETTINGS) -> Tuple[ServedModel, ...]:
    """Every model of the repository the export writes."""
    common = (
        ensemble(settings.cascade),
        uint8_ensemble(settings.cascade),
        NORMALIZE,
        embedder(settings.engine_cache_key),
        images(settings.decoder_instances),
    )
    if not settings.cascade:
        return (*common, postprocess(settings.strictness, settings.concepts_dir, settings.cosine_bound))
    return (
        *common,
        postprocess(settings.strictness, settings.concepts_dir),
        embedder(settings.int8_engine_cache_key, spec.INT8_EMBEDDER_MODEL),
        cascade(settings.cosine_bound),
    )


def committed_models() -> Tuple[ServedModel, ...]:
    """What model_repository/ holds configs for: every model of a plain export, and the cascade (its code's home)."""
    return (*served_models(REFERENCE_SETTINGS), cascade())
