"""safety_checker_embedder_int8 on CPU (configs/cpu.pbtxt): the cascade's dynamically quantised embedder.

Only a --cascade export serves this model: the int8 model.onnx the export
quantised and measured, run with onnxruntime like the fp32 embedder.
"""

from safety_checker_served.onnx_runner import OnnxRunner as TritonPythonModel  # noqa: F401
