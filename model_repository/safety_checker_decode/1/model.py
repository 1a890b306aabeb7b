"""safety_checker_decode: image files -> every view of them as uint8 images, the first step of safety_checker_images.

Each element of a request is one image file (PNG, JPEG, WebP, GIF, BMP,
TIFF), its raw bytes or their base64 text, decoded within the limits of this
config's parameters into its views (safety_checker_served.decoding): each
frame of an animation, and each frame that is not opaque twice, composited
and with its alpha dropped. The ensemble checks every view as
safety_checker_uint8 checks an image, and its last step answers each file by
its first flagged view; the `views` output says whose view each row is.

Nothing is answered until every element of a request decoded: one element that
cannot be checked refuses its request with INVALID_ARG naming its index, and
the other requests of the batch are decoded as usual; an unexpected failure
answers its own request alone. The ensemble forwards a request's parameters
to every step; the strictness ones are the postprocessor's to read, so here
they are only accepted by name.

Decoding is CPU work: every configuration runs this model on CPU instances.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from safety_checker_served import decoding
from safety_checker_served.model_config import ModelConfig
from safety_checker_served.request_failure import failed_request
from safety_checker_served.request_limits import RequestLimits


class TritonPythonModel:
    def initialize(self, args):
        config = ModelConfig(args)
        (self.input_name,) = config.inputs
        self.images_name, self.views_name = config.outputs
        self.request_limits = RequestLimits(config.parameters)
        self.limits = decoding.limits_from(config.parameters)
        decoding.set_pillow_limit(self.limits)
        pb_utils.Logger.log_info(
            f"decoding {', '.join(self.limits.formats)} files of at most {self.limits.max_encoded_bytes} bytes, "
            f"{self.limits.max_pixels} pixels, aspect ratio {self.limits.max_aspect_ratio:g} and "
            f"{self.limits.max_frames} frames; at most {self.limits.max_views} views a request"
        )

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            return self._decoded(request)
        except Exception as error:  # ours, not the request's: it fails this request alone, and says nothing more
            return failed_request("decoding a request", error, "decode")

    def _decoded(self, request):
        _, problem = self.request_limits.parameters(request.parameters())
        elements = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
        if problem is None:
            problem = self.request_limits.images(len(elements))
        if problem is not None:
            return _refused(problem)
        try:
            images, views = decoding.decode(elements, self.limits)
        except (decoding.ImageRefused, decoding.RequestRefused) as error:
            return _refused(f"{error}; nothing in this request was checked")
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(self.images_name, np.ascontiguousarray(images)),
                pb_utils.Tensor(self.views_name, views),
            ]
        )


def _refused(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
