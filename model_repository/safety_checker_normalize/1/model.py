"""safety_checker_normalize on CPU (configs/cpu.pbtxt): uint8 images -> CLIP pixel_values.

The folder's model.onnx is a 256x3 lookup table, bit-identical to the
client's rescaling and normalisation; this Python model runs it with
onnxruntime in the bundled tritonserver. On a GPU config.pbtxt serves the
same file with Triton's onnxruntime backend.
"""

from safety_checker_served.onnx_runner import OnnxRunner as TritonPythonModel  # noqa: F401
