"""The exported embedder is one TensorRT graph: no DOUBLE tensor, only operators TensorRT 10 parses.

TensorRT has no DOUBLE type; a DOUBLE tensor (what torch.isfinite exports to)
or an unsupported operator makes onnxruntime's TensorRT provider hand those
nodes to the CUDA or CPU provider, splitting the graph (issue 12, point 5).
The non-finite count that replaced it must still be exact per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from export.graph import EmbedderGraph
from export.onnx_export import export_onnx
from fixtures.checkers import build_checker
from safety_checker_client import spec

# Every operator marked "Y" in onnx/onnx-tensorrt docs/operators.md, branch 10.0-GA
# (commit 73f629e04a68765647010b98dd94257282d05d11), the first TensorRT 10 release;
# later 10.x releases only add to it.
TENSORRT_10_OPERATORS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)
# The same file: IsInf takes FP32/FP16/BF16 only, IsNaN floating or integer inputs.
FLOAT_INPUT_OPERATORS = ("IsInf", "IsNaN")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    export_onnx(EmbedderGraph(build_checker()), path)
    return path


@pytest.fixture(scope="module")
def inferred(onnx_file) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(onnx.load(str(onnx_file)), strict_mode=True)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those of subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _nodes(sub)


def _tensor_types(model: onnx.ModelProto) -> dict:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def test_no_double_tensor_anywhere(inferred):
    doubles: List[str] = [name for name, elem in _tensor_types(inferred).items() if elem == TensorProto.DOUBLE]
    for node in _nodes(inferred.graph):
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.DOUBLE:
                doubles.append(f"{node.op_type} {node.name} casts to DOUBLE")
            if attribute.HasField("t") and attribute.t.data_type == TensorProto.DOUBLE:
                doubles.append(f"{node.op_type} {node.name} holds a DOUBLE tensor")
    assert not doubles, doubles


def test_every_operator_is_parsed_by_tensorrt_10(inferred):
    used = {node.op_type for node in _nodes(inferred.graph)}
    assert used - TENSORRT_10_OPERATORS == set()
    assert all(node.domain in ("", "ai.onnx") for node in _nodes(inferred.graph))


def test_nan_and_inf_checks_read_float32(inferred):
    types = _tensor_types(inferred)
    checks = [node for node in _nodes(inferred.graph) if node.op_type in FLOAT_INPUT_OPERATORS]
    assert checks, "the graph no longer checks for non-finite pixels"
    assert all(types[node.input[0]] == TensorProto.FLOAT for node in checks)


def test_nonfinite_output_keeps_its_contract(inferred):
    (output,) = [o for o in inferred.graph.output if o.name == spec.NONFINITE_VALUES.name]
    assert output.type.tensor_type.elem_type == TensorProto.INT64
    assert [d.dim_value or d.dim_param for d in output.type.tensor_type.shape.dim][1:] == [1]


def _images_with_nonfinite() -> tuple:
    """A batch with 0, 1 NaN, 1 +Inf, 1 -Inf, a mix, and an all-NaN image; and the counts it holds."""
    shape = (spec.NUM_CHANNELS, spec.IMAGE_SIZE, spec.IMAGE_SIZE)
    images = np.random.default_rng(0).standard_normal((6, *shape)).astype(np.float32)
    images[0, 0, 0, 0] = np.finfo(np.float32).max  # large but finite: not counted
    images[1, 2, 100, 7] = np.nan
    images[2, 0, 223, 223] = np.inf
    images[3, 1, 0, 50] = -np.inf
    mix = np.random.default_rng(1).choice(images[4].size, size=1000, replace=False)
    images[4].reshape(-1)[mix] = np.resize(np.array([np.nan, np.inf, -np.inf], dtype=np.float32), mix.size)
    images[5] = np.nan
    return images, np.array([[0], [1], [1], [1], [1000], [images[5].size]], dtype=np.int64)


@pytest.mark.parametrize("level", ["ORT_DISABLE_ALL", "ORT_ENABLE_ALL"])
def test_nonfinite_count_is_exact_per_image(onnx_file, level):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    images, expected = _images_with_nonfinite()
    (counts,) = session.run([spec.NONFINITE_VALUES.name], {spec.PIXEL_VALUES.name: images})
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, expected)
    (single,) = session.run([spec.NONFINITE_VALUES.name], {spec.PIXEL_VALUES.name: images[1:2]})
    np.testing.assert_array_equal(single, expected[1:2])


def test_layer_norms_are_decomposed_for_the_tensorrt_fp32_fallback(inferred, onnx_file):
    """Each LayerNorm exports as Pow -> ReduceMean (the variance), the pattern trt_layer_norm_fp32_fallback keeps in
    fp32 under FP16; onnxruntime's CPU provider fuses every one back into its LayerNormalization kernel."""
    import onnxruntime as ort
    from torch import nn

    layer_norms = sum(isinstance(m, nn.LayerNorm) for m in build_checker().vision_model.modules())
    nodes = list(_nodes(inferred.graph))
    producers = {output: node for node in nodes for output in node.output}
    assert "LayerNormalization" not in {n.op_type for n in nodes}
    variances = [n for n in nodes if n.op_type == "ReduceMean" and producers[n.input[0]].op_type == "Pow"]
    assert len(variances) == layer_norms > 0

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(onnx_file.with_name("optimized.onnx"))
    ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    fused = [n for n in optimized.graph.node if n.op_type == "LayerNormalization"]
    assert len(fused) == layer_norms and "Pow" not in {n.op_type for n in optimized.graph.node}
