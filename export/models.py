"""One description per served model that runs code: the single source of every such config.pbtxt.

The normaliser, the embedder (and the cascade's int8 one), the postprocessor
and the cascade, each described once in the vocabulary of
`export.description`; the images ensemble's own models are in
`export.image_models`, the ensembles that chain them all in `export.ensembles`.
`export.configs` renders every config.pbtxt from these descriptions, and
`export.repository` writes each Python model's packed environment from its
`requirements`; nothing about a served model is written anywhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Tuple

from export.description import (
    CPU_CONFIG_NAME,
    FAST_CONFIG_NAME,
    Accelerator,
    Parameter,
    ServedModel,
    Variant,
    queue,
)
from export.ensembles import ensemble, images_ensemble, uint8_ensemble
from export.image_models import REFERENCE_DECODER_INSTANCES, VIEWS, decoder
from export.parameters import ENVIRONMENT, NO_ARENA, ONNX_FILE, REQUEST_LIMITS, STRICTNESS_PARAMETERS
from export.queues import (
    CPU_MAX_QUEUE,
    CPU_QUEUE_DELAY_US,
    CPU_QUEUE_TIMEOUT_US,
    GPU_MAX_QUEUE,
    GPU_QUEUE_DELAY_US,
    GPU_QUEUE_TIMEOUT_US,
    POSTPROCESS_MAX_QUEUE,
    POSTPROCESS_QUEUE_DELAY_US,
    POSTPROCESS_QUEUE_TIMEOUT_US,
)
from safety_checker_client import spec
from safety_checker_client.preprocess import normalization_table

# GPU: two instances, so that one batch's copies and batch formation overlap the other's compute.
GPU_INSTANCES = 2
# TensorRT engine profile and cache (fast configuration).
GPU_OPT_BATCH = 16
GPU_WORKSPACE_BYTES = 4 << 30
GPU_ENGINE_CACHE = "/trt-cache"
# The engine cache prefix of the committed reference configs; the export writes model.onnx's digest.
REFERENCE_ENGINE_KEY = "not-exported"

_NO_DELAY_GPU = queue(
    0,
    GPU_MAX_QUEUE,
    GPU_QUEUE_TIMEOUT_US,
    """No queue delay: each request goes straight on to the embedder, which batches.
Dynamic batching is here for its bounded queue (see the embedder).""",
)
_CPU_QUEUE = queue(CPU_QUEUE_DELAY_US, CPU_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US)

NORMALIZE = ServedModel(
    spec.NORMALIZE_MODEL,
    spec.NORMALIZE_INPUTS,
    spec.NORMALIZE_OUTPUTS,
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
            """uint8 images -> pixel_values on CPU: the Python onnxruntime runner
(safety_checker_served.onnx_runner) on this folder's model.onnx, a table
lookup one thread keeps up with.""",
            config_name=CPU_CONFIG_NAME,
            instance_kind="KIND_CPU",
            batching=_CPU_QUEUE,
            parameters=(ONNX_FILE, Parameter("intra_op_num_threads", "1"), NO_ARENA, *REQUEST_LIMITS, ENVIRONMENT),
        ),
    ),
    # The CPU config's runner imports onnxruntime: the NGC image has no such Python package.
    requirements=("onnxruntime",),
)


def _profile_shape(batch: int) -> str:
    pixels = spec.PIXEL_VALUES
    return f"{pixels.name}:" + "x".join(str(d) for d in (batch, *pixels.dims))


def embedder(
    engine_cache_key: str = REFERENCE_ENGINE_KEY, name: str = spec.EMBEDDER_MODEL, quantized: bool = False
) -> ServedModel:
    """The embedder; `engine_cache_key` (model.onnx's digest) keeps TensorRT engines of different exports apart.
    `name`: the cascade's int8 embedder is the same description under its own name. `quantized`: its
    model.onnx is dynamically quantised, so each image runs alone on CPU."""
    batching = queue(
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
                batching=queue(CPU_QUEUE_DELAY_US, CPU_MAX_QUEUE, CPU_QUEUE_TIMEOUT_US),
                parameters=(
                    ONNX_FILE,
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
                    NO_ARENA,
                    Parameter(
                        "images_per_run",
                        "1" if quantized else "0",
                        """Images per onnxruntime run (0: the whole batch at once). 1 for a dynamically
quantised model, which quantises activations over the whole tensor it is given:
each image runs alone, so no image's values move another's answer.""",
                    ),
                    *REQUEST_LIMITS,
                    ENVIRONMENT,
                ),
                warmup_batch=1,
            ),
        ),
        requirements=("onnxruntime",),
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
        variants=(
            Variant(
                "python",
                f"""Thresholds, rounding and the special-care rule of diffusers'
StableDiffusionSafetyChecker.forward(), vectorised over every request of a
batch. Thresholds are read from 1/{spec.CONCEPTS_FILENAME}, written by the export;
custom concepts from 1/{spec.CUSTOM_CONCEPTS_FILENAME}, re-read whenever it changes.
Inputs and outputs are read by position, in the order declared here.""",
                instance_kind="KIND_CPU",
                batching=queue(
                    POSTPROCESS_QUEUE_DELAY_US,
                    POSTPROCESS_MAX_QUEUE,
                    POSTPROCESS_QUEUE_TIMEOUT_US,
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
                    *STRICTNESS_PARAMETERS,
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
                    ENVIRONMENT,
                ),
            ),
        ),
    )


def cascade(cosine_bound: float = 0.0) -> ServedModel:
    """The int8/fp32 cascade (BLS), answering for the ensembles of a --cascade repository."""
    names = ",".join(t.name for t in spec.EMBEDDER_OUTPUTS)
    return ServedModel(
        spec.CASCADE_MODEL,
        spec.ENSEMBLE_INPUTS,
        spec.ENSEMBLE_OUTPUTS,
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
                batching=queue(
                    0,
                    POSTPROCESS_MAX_QUEUE,
                    CPU_QUEUE_TIMEOUT_US,
                ),
                parameters=(
                    *REQUEST_LIMITS,
                    *STRICTNESS_PARAMETERS,
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
                    Parameter("nonfinite_output", spec.NONFINITE_VALUES.name),
                    Parameter(
                        "pixel_range",
                        json.dumps(normalization_table()[[0, -1]].T.tolist()),
                        """Per channel, the lowest and highest pixel_values a real image has (uint8 0 and
255, normalised as the client does). int8's error bound was measured on such
images: an image with a value outside this range goes to fp32 whatever int8 says.""",
                    ),
                    ENVIRONMENT,
                ),
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
    int8: bool = False  # the served embedder is dynamically quantised (--int8)
    int8_engine_cache_key: str = REFERENCE_ENGINE_KEY
    decoder_instances: int = REFERENCE_DECODER_INSTANCES  # the decoder's instances (--decoder-instances)


# What the committed model_repository/ configs are rendered with.
REFERENCE_SETTINGS = Settings()


def served_models(settings: Settings = REFERENCE_SETTINGS) -> Tuple[ServedModel, ...]:
    """Every model of the repository the export writes."""
    common = (
        ensemble(settings.cascade),
        uint8_ensemble(settings.cascade),
        images_ensemble(settings.cascade),
        decoder(settings.decoder_instances),
        VIEWS,
        NORMALIZE,
        embedder(settings.engine_cache_key, quantized=settings.int8 and not settings.cascade),
    )
    if not settings.cascade:
        return (*common, postprocess(settings.strictness, settings.concepts_dir, settings.cosine_bound))
    return (
        *common,
        postprocess(settings.strictness, settings.concepts_dir),
        embedder(settings.int8_engine_cache_key, spec.INT8_EMBEDDER_MODEL, quantized=True),
        cascade(settings.cosine_bound),
    )


def committed_models() -> Tuple[ServedModel, ...]:
    """What model_repository/ holds configs for: every model of a plain export, and the cascade's two (their code's
    home)."""
    return (*served_models(REFERENCE_SETTINGS), embedder(name=spec.INT8_EMBEDDER_MODEL, quantized=True), cascade())
