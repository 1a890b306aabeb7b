"""The int8/fp32 cascade: the fp32 checker's decisions at close to int8's speed.

Every image of a batch goes through the int8 embedder in one call (which runs
each image alone: no image's values move another's answer). The postprocessor
scores each request with the int8 error bound (the export measured it, with a
safety factor; config parameter `cosine_bound`) and says per image whether any
cosine within that bound could change a decision (its `decision_certain`
output, which the ensembles do not show). Those images, and every image whose
pixel_values lie outside what a real image has (`pixel_range`: the bound was
measured on such images only), go through the fp32 embedder, in one call for
the whole batch, and are scored again with a bound of 0: their answer is the
fp32 checker's, exactly (`exact_scores` true). Every other image keeps int8's
answer, whose decision fp32 cannot differ from and whose scores lie within the
bound of fp32's. Request parameters (strictness) reach both postprocessor calls. What
the request itself is at fault for (a bad parameter, non-finite pixels) is
refused here with INVALID_ARG, because an error that comes back through BLS
has lost its status; an error of any step answers the request. An
unexpected error of the cascade's own fails only the request it comes from:
the batch is then answered request by request, and a request that still
fails gets INTERNAL with a message that names no path, exception or value
(the log names the exception's type).

Counted in Prometheus: safety_checker_cascade_images_total{embedder="int8"|"fp32"}.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from safety_checker_served.model_config import ModelConfig
from safety_checker_served.request_failure import failed_request
from safety_checker_served.request_limits import RequestLimits
from safety_checker_served.scoring import nonfinite_refusal
from safety_checker_served.strictness import Strictness


class StepError(Exception):
    """A model the cascade calls answered with an error; it becomes the request's answer."""

    def __init__(self, error):
        super().__init__(error.message())
        self.error = error


class TritonPythonModel:
    def initialize(self, args):
        config = ModelConfig(args)
        parameters = config.parameters
        (self.pixels,) = config.inputs
        self.outputs = config.outputs
        self.exact = self.outputs[-1]  # by position: the last output says which answers are fp32's
        self.bound = float(parameters["cosine_bound"])
        self.limits = RequestLimits(parameters)
        self.strictness = Strictness(parameters)
        self.int8 = parameters["int8_embedder"]
        self.fp32 = parameters["fp32_embedder"]
        self.postprocessor = parameters["postprocessor"]
        self.embedded = parameters["embedder_outputs"].split(",")
        self.certain = parameters["decision_certain_output"]
        # What the postprocessor answers (and whether it is sure); the rest (image_embeds) comes from the embedder.
        self.scored = [name for name in self.outputs if name not in self.embedded] + [self.certain]
        self.bound_input = parameters["cosine_bound_input"]
        self.nonfinite = parameters["nonfinite_output"]
        # [3, 2] per channel: the pixel_values of a real image, on which int8's bound was measured.
        low, high = np.array(json.loads(parameters["pixel_range"]), dtype=np.float32).T
        self.low, self.high = low[:, None, None], high[:, None, None]
        # Kept on self: a MetricFamily must outlive its Metrics.
        self.family = family = pb_utils.MetricFamily(
            name="safety_checker_cascade_images_total",
            description="Images the cascade answered, by the embedder whose cosines answered them",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.answered = {kind: family.Metric(labels={"embedder": kind}) for kind in ("int8", "fp32")}

    def execute(self, requests):
        refused = [self._refusal(r) for r in requests]
        if any(refused):
            checked = self.execute([r for r, no in zip(requests, refused) if no is None]) if not all(refused) else []
            answers = iter(checked)
            return [pb_utils.InferenceResponse(error=no) if no is not None else next(answers) for no in refused]
        try:
            return self._answered(requests)
        except Exception:  # ours, not a request's: each request alone, so that it fails only the one it is in
            return [self._alone(request) for request in requests]

    def _alone(self, request):
        try:
            (response,) = self._answered([request])
            return response
        except Exception as error:
            return failed_request("answering a request through the cascade", error)

    def _answered(self, requests):
        """Every request's response: int8 for the whole batch in one call, fp32 for what int8 is unsure of."""
        pixels = [pb_utils.get_input_tensor_by_name(r, self.pixels).as_numpy() for r in requests]
        parameters = [_forwardable(json.loads(r.parameters() or "{}")) for r in requests]
        answers = [None] * len(requests)
        try:
            embedded = self._embed(self.int8, np.concatenate(pixels))
        except StepError as failure:
            return [pb_utils.InferenceResponse(error=failure.error) for _ in requests]
        start, redo = 0, []  # redo: (request index, its rows that need fp32)
        for index, (batch, params) in enumerate(zip(pixels, parameters)):
            rows = slice(start, start + len(batch))
            start += len(batch)
            refusal = nonfinite_refusal(embedded[self.nonfinite][rows])
            if refusal is not None:
                answers[index] = StepError(pb_utils.TritonError(refusal, pb_utils.TritonError.INVALID_ARG))
                continue
            try:
                answers[index] = self._score({k: v[rows] for k, v in embedded.items()}, self.bound, params)
            except StepError as failure:
                answers[index] = failure
                continue
            sure = answers[index].pop(self.certain).reshape(-1) & self._real(batch)
            uncertain = np.flatnonzero(~sure)
            if len(uncertain):
                redo.append((index, uncertain))
        if redo:
            try:
                exact = self._embed(self.fp32, np.concatenate([pixels[i][rows] for i, rows in redo]))
            except StepError as failure:
                for index, _ in redo:
                    answers[index] = failure
                redo = []
            start = 0
            for index, rows in redo:
                part = slice(start, start + len(rows))
                start += len(rows)
                try:
                    again = self._score({k: v[part] for k, v in exact.items()}, 0.0, parameters[index])
                    del again[self.certain]
                except StepError as failure:
                    answers[index] = failure
                    continue
                for name in self.outputs:
                    answers[index][name][rows] = again[name]
        responses = [self._response(answer) for answer in answers]
        exact = [int(np.count_nonzero(a[self.exact])) for a in answers if not isinstance(a, StepError)]
        images = [len(a[self.exact]) for a in answers if not isinstance(a, StepError)]
        self.answered["fp32"].increment(sum(exact))  # counted once every response is made
        self.answered["int8"].increment(sum(images) - sum(exact))
        return responses

    def _refusal(self, request):
        """INVALID_ARG for an unknown request parameter, too many images or a bad strictness, before any model
        runs: an error coming back through BLS has lost its status (it is INTERNAL, which a client retries)."""
        _, problem = self.limits.parameters(request.parameters())
        if problem is None:
            problem = self.limits.images(len(pb_utils.get_input_tensor_by_name(request, self.pixels).as_numpy()))
        if problem is None:
            _, problem = self.strictness.of(request.parameters())
        return None if problem is None else pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)

    def _real(self, pixels):
        """bool [N]: whether each image's pixel_values are all within what a real image has."""
        return np.all((pixels >= self.low) & (pixels <= self.high), axis=(1, 2, 3))

    def _response(self, answer):
        if isinstance(answer, StepError):
            return pb_utils.InferenceResponse(error=answer.error)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, answer[n]) for n in self.outputs])

    def _call(self, model, tensors, names, parameters=None):
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in tensors.items()],
            requested_output_names=names,
            parameters=parameters or {},
        )
        response = request.exec()
        if response.has_error():
            raise StepError(response.error())
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy().copy() for name in names}

    def _embed(self, model, pixels):
        return self._call(model, {self.pixels: pixels}, self.embedded)

    def _score(self, embedded, bound, parameters):
        """Every output for these images: the postprocessor's, with the embedder's own (image_embeds)."""
        tensors = dict(embedded)
        tensors[self.bound_input] = np.full((len(embedded[self.embedded[0]]), 1), bound, dtype=np.float64)
        answer = self._call(self.postprocessor, tensors, self.scored, parameters)
        answer.update({name: embedded[name] for name in self.outputs if name in embedded})
        return answer


def _forwardable(parameters):
    """A request's parameters as a BLS request takes them: bool, int or str (a float goes as its repr, which the
    postprocessor reads back to the same float)."""
    return {key: repr(value) if isinstance(value, float) else value for key, value in parameters.items()}
