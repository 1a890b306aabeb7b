"""The uint8 front of the served graph: images [N, 224, 224, 3] -> pixel_values.

Rescaling by 1/255 and normalising per channel act on each uint8 value alone,
so the whole step is a lookup in the client's own 256x3 table
(`normalization_table`). A lookup is bit-identical to CLIPImageProcessor on
every execution provider, where re-doing the float arithmetic on a GPU could
differ in the last bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import VerificationError
from safety_checker_client import spec
from safety_checker_client.preprocess import normalization_table, normalize

# Opset and IR version the NGC container's onnxruntime (24.10) reads.
OPSET = 17
IR_VERSION = 8


def normalizer_model() -> onnx.ModelProto:
    """images (uint8, NHWC) -> pixel_values (float32, NCHW) via Gather on the flattened table."""
    channels = spec.NUM_CHANNELS
    table = numpy_helper.from_array(normalization_table().reshape(-1), "table")  # index = level * 3 + channel
    stride = numpy_helper.from_array(np.array(channels, dtype=np.int64), "channels")
    offsets = numpy_helper.from_array(np.arange(channels, dtype=np.int64), "channel_offsets")
    (images,), (pixels,) = spec.NORMALIZE_INPUTS, spec.NORMALIZE_OUTPUTS
    nodes = [
        helper.make_node("Cast", [images.name], ["levels"], to=TensorProto.INT64),
        helper.make_node("Mul", ["levels", "channels"], ["rows"]),
        helper.make_node("Add", ["rows", "channel_offsets"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["normalized"], axis=0),
        helper.make_node("Transpose", ["normalized"], [pixels.name], perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "safety_checker_normalize",
        [helper.make_tensor_value_info(images.name, TensorProto.UINT8, ["batch", *images.dims])],
        [helper.make_tensor_value_info(pixels.name, TensorProto.FLOAT, ["batch", *pixels.dims])],
        initializer=[table, stride, offsets],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def write_normalizer(path: Path) -> None:
    """Write the normaliser after proving onnxruntime reproduces the client's `normalize` bit for bit."""
    import onnxruntime as ort

    model = normalizer_model()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, size=(2, *spec.IMAGES.dims), dtype=np.uint8)
    images.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # every level at least once
    (got,) = session.run(None, {spec.IMAGES.name: images})
    if not np.array_equal(got, normalize(images)):
        raise VerificationError("the ONNX normaliser differs from the client's preprocessing")
    onnx.save(model, str(path))
