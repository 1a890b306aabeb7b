"""safety_checker_normalize on CPU (configs/cpu.pbtxt): uint8 images -> CLIP pixel_values.

The folder's model.onnx is a 256x3 lookup table, bit-identical to the
client's rescaling and normalisation; this Python model tabulates it with
onnxruntime at load and serves it as a NumPy lookup in the bundled
tritonserver (safety_checker_served.lookup_runner). On a GPU config.pbtxt
serves the same file with Triton's onnxruntime backend.
"""

from safety_checker_served.lookup_runner import LookupRunner as TritonPythonModel  # noqa: F401
