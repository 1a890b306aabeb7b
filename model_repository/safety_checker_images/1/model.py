"""safety_checker_images: the checker fed image files, decoded here, answered in the contract's order.

Each request's elements (raw image files, or base64 text of them) are decoded
by decoding.py with the client's own preprocessing (preprocess.py and spec.py,
copied into this folder by the export), then checked by the `safety_checker`
ensemble through a BLS call, and its outputs are returned in this config's
order, `has_nsfw_concepts` first. A Triton ensemble cannot do the last part:
it answers a JSON request in the iteration order of a hash map of its output
names (docs/images.md), which puts the decision last; a Python model's
answer keeps the order it gives.

Nothing is forwarded until every element decoded: one bad element refuses
the whole request with INVALID_ARG naming its index, and a bad strictness
parameter is refused here with the postprocessor's own words (strictness.py,
its copy), because an error that comes back through BLS has lost its status.

Decoding is CPU work, so every configuration runs this model on CPU
instances, as many as the export was told (one per core by default).
"""

import json
import os
import sys
import types

import triton_python_backend_utils as pb_utils

_FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _FOLDER)

# The client's preprocess.py imports its spec.py as `safety_checker_client.spec`: serve both from the copies
# in this folder under that package name, whether or not the client package is installed in this Python.
_client = types.ModuleType("safety_checker_client")
_client.__path__ = [_FOLDER]
sys.modules["safety_checker_client"] = _client

from request_limits import RequestLimits  # noqa: E402
from strictness import Strictness  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        # Tensor names come from the config: one input (encoded files), the outputs in the contract's order.
        (self.input_name,) = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.checker_model = parameters["checker_model"]
        self.checker_input = parameters["checker_input"]
        self.strictness = Strictness(parameters)
        self.request_limits = RequestLimits(parameters)
        try:
            import decoding  # Pillow: in the NGC container it must be installed (docs/gpu.md)
        except ImportError as error:
            # Load anyway, so that the other models keep serving; every request is refused and says why.
            self.unavailable = (
                f"{args['model_name']} cannot decode images: {error}. Install Pillow into the Triton image "
                "(docs/gpu.md); nothing in this request was checked"
            )
            pb_utils.Logger.log_error(self.unavailable)
            return
        self.unavailable = None
        self.decoding = decoding
        self.limits = decoding.limits_from(parameters)
        decoding.set_pillow_limit(self.limits)
        pb_utils.Logger.log_info(
            f"decoding {', '.join(self.limits.formats)} files of at most {self.limits.max_encoded_bytes} bytes and "
            f"{self.limits.max_pixels} pixels; checked by {self.checker_model}"
        )

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        if self.unavailable is not None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(self.unavailable))
        _, problem = self.request_limits.parameters(request.parameters())
        if problem is None:
            adjustment, problem = self.strictness.of(request.parameters())
        if problem is not None:
            return _refused(problem)
        elements = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
        try:
            pixels = self.decoding.decode(elements, self.limits)
        except self.decoding.ImageRefused as error:
            return _refused(f"{error}; nothing in this request was checked")

        requested = set(request.requested_output_names()) or set(self.output_names)
        names = [name for name in self.output_names if name in requested]
        forwarded = {} if adjustment is None else {self.strictness.adjustment_parameter: repr(adjustment)}
        answer = pb_utils.InferenceRequest(
            model_name=self.checker_model,
            inputs=[pb_utils.Tensor(self.checker_input, pixels)],
            requested_output_names=names,
            parameters=forwarded,
        ).exec()
        if answer.has_error():
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(
                    f"{self.checker_model}: {answer.error().message()}; nothing in this request was checked"
                )
            )
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.get_output_tensor_by_name(answer, name) for name in names]
        )


def _refused(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
