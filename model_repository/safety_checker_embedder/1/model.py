"""safety_checker_embedder on CPU (configs/cpu.pbtxt): the CLIP vision tower, projection and cosines.

The bundled tritonserver has no onnxruntime backend, so this Python model
runs the folder's model.onnx with onnxruntime; on a GPU config.pbtxt serves
the same file with Triton's onnxruntime backend instead.
"""

from safety_checker_served.onnx_runner import OnnxRunner as TritonPythonModel  # noqa: F401
