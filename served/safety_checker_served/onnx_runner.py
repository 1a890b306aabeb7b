"""Runs a version folder's ONNX file with onnxruntime inside Triton's Python backend.

The CPU configs (configs/cpu.pbtxt) of the embedder, the cascade's int8
embedder and the normaliser serve their model.onnx with this runner in the
bundled tritonserver, which has no onnxruntime backend; each model's
`1/model.py` names it as its `TritonPythonModel`. All requests of a dynamic
batch go through one session run, so batching pays off as it does on the
onnxruntime backend. A request that breaks a limit of request_limits.py (an
unknown request parameter, too many images) gets INVALID_ARG and is not run;
the others of its batch are. When the batch's run fails unexpectedly, each
request runs alone, so that the error fails only the request it comes from;
that one gets INTERNAL with a message that names no path, exception or value
(the log names the exception's type).

A dynamically quantised (int8) model quantises its activations over the whole
tensor it is given, so one image's values would move every other image's
answer: its config sets `images_per_run` to 1, and each image runs alone.

Imported inside Triton's Python backend only (or a test's stand-in for it).
"""

from __future__ import annotations

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from safety_checker_served.model_config import ModelConfig
from safety_checker_served.request_failure import failed_request
from safety_checker_served.request_limits import RequestLimits
from safety_checker_served.session import onnx_session


class OnnxRunner:
    def initialize(self, args):
        config = ModelConfig(args)
        self.input_name = config.inputs[0]
        self.output_names = config.outputs
        self.limits = RequestLimits(config.parameters)
        self.images_per_run = int(config.parameters.get("images_per_run", "0"))
        self.session = onnx_session(
            os.path.join(config.version_dir, config.parameters["onnx_filename"]), config.parameters
        )

    def execute(self, requests):
        batches, errors = [], []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            _, error = self.limits.parameters(request.parameters())
            errors.append(error or self.limits.images(len(batch)))
            batches.append(batch)
        run = [b for b, e in zip(batches, errors) if e is None]
        try:
            answers = self._answers(run)
        except Exception:  # ours, not a request's: each request alone, so that it fails only the one it is in
            answers = [self._alone(batch) for batch in run]
        answered = iter(answers)
        return [
            pb_utils.InferenceResponse(error=pb_utils.TritonError(error, pb_utils.TritonError.INVALID_ARG))
            if error is not None
            else next(answered)
            for error in errors
        ]

    def _answers(self, batches):
        """A response for each of these requests' images, from one run (or one per `images_per_run`)."""
        if not batches:
            return []
        outputs = self._run(batches[0] if len(batches) == 1 else np.concatenate(batches))
        responses = []
        start = 0
        for batch in batches:
            size = len(batch)
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value[start : start + size]))
                for name, value in zip(self.output_names, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _alone(self, batch):
        try:
            (response,) = self._answers([batch])
            return response
        except Exception as error:
            return failed_request("running a request", error)

    def _run(self, batch):
        """The session's outputs for the batch: one run, or one per `images_per_run` images."""
        step = self.images_per_run or len(batch)
        runs = [
            self.session.run(self.output_names, {self.input_name: batch[i : i + step]})
            for i in range(0, len(batch), step)
        ]
        return runs[0] if len(runs) == 1 else [np.concatenate(column) for column in zip(*runs)]
