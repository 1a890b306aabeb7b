"""Runs the version folder's ONNX file with onnxruntime inside Triton's Python backend.

The CPU configs (configs/cpu.pbtxt) of the embedder and of the normaliser
(whose 1/model.py is a copy of this one, made by the export) use it in the
bundled tritonserver, which has no onnxruntime backend. All requests of a
dynamic batch go through one session run, so batching pays off as it does on
the onnxruntime backend. A request that breaks a limit of request_limits.py
(an unknown request parameter, too many images) gets INVALID_ARG and is not
run; the others of its batch are.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from request_limits import RequestLimits
from session import onnx_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.limits = RequestLimits(parameters)

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.session = onnx_session(os.path.join(version_dir, parameters["onnx_filename"]), parameters)

    def execute(self, requests):
        batches, errors = [], []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            _, error = self.limits.parameters(request.parameters())
            errors.append(error or self.limits.images(len(batch)))
            batches.append(batch)
        run = [b for b, e in zip(batches, errors) if e is None]
        outputs = []
        if run:
            batch = run[0] if len(run) == 1 else np.concatenate(run)
            outputs = self.session.run(self.output_names, {self.input_name: batch})

        responses = []
        start = 0
        for batch, error in zip(batches, errors):
            if error is not None:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(error, pb_utils.TritonError.INVALID_ARG))
                )
                continue
            size = len(batch)
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + size]))
                for name, value in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
