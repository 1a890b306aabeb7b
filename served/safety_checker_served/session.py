"""The onnxruntime session of the CPU runner, from the model config's parameters.

A module of its own (no Triton imports) so that `make bench` runs its
in-process onnxruntime baseline with exactly the served session options.
"""

import onnxruntime as ort


def onnx_session(path: str, parameters: dict) -> ort.InferenceSession:
    """`intra_op_num_threads` (0: every physical core), `cpu_mem_arena` ("0": activations are allocated per run
    and handed back, instead of an arena that keeps the largest batch's memory for good) and any onnxruntime
    session config entry ("session.intra_op.allow_spinning", ...) under its own name."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(parameters.get("intra_op_num_threads", "0"))
    options.enable_cpu_mem_arena = parameters.get("cpu_mem_arena", "1") != "0"
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in parameters.items():
        if key.startswith("session."):
            options.add_session_config_entry(key, value)
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
