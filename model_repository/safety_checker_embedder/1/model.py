"""Runs the version folder's ONNX file with onnxruntime inside Triton's Python backend.

The CPU configs (configs/cpu.pbtxt) of the embedder and of the normaliser
(whose 1/model.py links here) use it in the bundled tritonserver, which has no
onnxruntime backend. All requests of a dynamic batch go through one session
run, so batching pays off as it does on the onnxruntime backend.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from session import onnx_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.session = onnx_session(os.path.join(version_dir, parameters["onnx_filename"]), parameters)

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [len(b) for b in batches]
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
        outputs = self.session.run(self.output_names, {self.input_name: batch})

        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + size]))
                for name, value in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
