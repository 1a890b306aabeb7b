"""safety_checker_views: every view's answer -> one answer per image file, the last step of safety_checker_images.

The decoder made one or more views of each file (every frame of an
animation; a frame that is not opaque composited and with its alpha dropped),
and every view was checked as one image. Here each file gets the answer of
its first flagged view, else of its first view (frame 0 as a viewer shows
it), and a `view` output saying which (safety_checker_served.views). Inputs
are read by position: the per-view answers in the order of this config's
outputs, then the decoder's `views`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from safety_checker_served.model_config import ModelConfig
from safety_checker_served.request_failure import failed_request
from safety_checker_served.request_limits import RequestLimits
from safety_checker_served.views import chosen


class TritonPythonModel:
    def initialize(self, args):
        config = ModelConfig(args)
        *self.answers, self.views = config.inputs
        *self.outputs, self.view = config.outputs
        if len(self.answers) != len(self.outputs):
            raise pb_utils.TritonModelException("the config must have one per-view input per answer output")
        self.flagged = self.answers[0]  # by position: has_nsfw_concepts comes first
        self.limits = RequestLimits(config.parameters)

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            return self._reduced(request)
        except Exception as error:  # ours, not the request's: it fails this request alone, and says nothing more
            return failed_request("answering a request's views", error)

    def _reduced(self, request):
        views = pb_utils.get_input_tensor_by_name(request, self.views).as_numpy()
        _, problem = self.limits.parameters(request.parameters())
        if problem is None:
            problem = self.limits.images(int(views[:, 0].max()) + 1 if len(views) else 0)
        if problem is not None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG))
        flagged = pb_utils.get_input_tensor_by_name(request, self.flagged).as_numpy().reshape(-1).astype(bool)
        rows, described = chosen(flagged, views)
        tensors = [
            pb_utils.Tensor(
                name, np.ascontiguousarray(pb_utils.get_input_tensor_by_name(request, source).as_numpy()[rows])
            )
            for source, name in zip(self.answers, self.outputs)
        ]
        tensors.append(pb_utils.Tensor(self.view, np.array(described, dtype=object).reshape(-1, 1)))
        return pb_utils.InferenceResponse(output_tensors=tensors)
