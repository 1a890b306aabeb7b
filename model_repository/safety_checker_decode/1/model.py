"""safety_checker_decode: image files -> the resized and cropped uint8 images, the first step of safety_checker_images.

Each element of a request is one image file (PNG, JPEG, WebP, GIF, BMP,
TIFF), its raw bytes or their base64 text, decoded with the client's own
preprocessing (safety_checker_served.decoding), within the limits of this
config's parameters. The ensemble hands the images to the normaliser, the
embedder and the postprocessor, as safety_checker_uint8 does, so an image file
gets exactly the answer its pixels get.

Nothing is answered until every element of a request decoded: one element that
cannot be checked refuses its request with INVALID_ARG naming its index, and
the other requests of the batch are decoded as usual. The ensemble forwards a
request's parameters to every step; the strictness ones are the
postprocessor's to read, so here they are only accepted by name.

Decoding is CPU work: every configuration runs this model on CPU instances.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from safety_checker_served import decoding
from safety_checker_served.model_config import ModelConfig
from safety_checker_served.request_limits import RequestLimits


class TritonPythonModel:
    def initialize(self, args):
        config = ModelConfig(args)
        (self.input_name,) = config.inputs
        (self.output_name,) = config.outputs
        self.request_limits = RequestLimits(config.parameters)
        self.limits = decoding.limits_from(config.parameters)
        decoding.set_pillow_limit(self.limits)
        pb_utils.Logger.log_info(
            f"decoding {', '.join(self.limits.formats)} files of at most {self.limits.max_encoded_bytes} bytes "
            f"and {self.limits.max_pixels} pixels"
        )

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        _, problem = self.request_limits.parameters(request.parameters())
        elements = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
        if problem is None:
            problem = self.request_limits.images(len(elements))
        if problem is not None:
            return _refused(problem)
        try:
            images = decoding.decode(elements, self.limits)
        except decoding.ImageRefused as error:
            return _refused(f"{error}; nothing in this request was checked")
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(self.output_name, np.ascontiguousarray(images))]
        )


def _refused(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
