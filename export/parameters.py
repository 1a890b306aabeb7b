"""Config parameters shared by several served models: what a request may carry, strictness, the environment.

Each is a `Parameter` of the description vocabulary; the models that read one
(safety_checker_served) take its key from here through their config, never
from a constant of their own.
"""

from __future__ import annotations

import json

from export.description import Parameter
from safety_checker_client import spec

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

# What every Python model refuses, read from its config (safety_checker_served.request_limits).
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

# How requests choose a strictness: read by the postprocessor (safety_checker_served.strictness).
STRICTNESS_PARAMETERS = (
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

ONNX_FILE = Parameter(
    "onnx_filename", spec.ONNX_FILENAME, "The ONNX file in the version folder, shared with the onnxruntime backend."
)

# onnxruntime's CPU memory arena keeps the memory of the largest batch it ran for as long as the server runs
# (measured: 175 MB of the tiny test checker after 32-image batches); off, activations go back after each run.
NO_ARENA = Parameter(
    "cpu_mem_arena",
    "0",
    "0: onnxruntime allocates each run's activations and hands them back (no arena that only grows).",
)

# The packed Python environment in every Python model's folder (export.environment writes it).
ENVIRONMENT_FILENAME = "python_env.tar.gz"
ENVIRONMENT = Parameter(
    "EXECUTION_ENV_PATH",
    f"$$TRITON_MODEL_DIRECTORY/{ENVIRONMENT_FILENAME}",
    """The Python backend's execution environment, packed by the export: this project's served
package, the client's contract and preprocessing, and what else this model imports, for the
NGC image's Python 3.10 and the bundled server's Python (docs/export.md).""",
)
