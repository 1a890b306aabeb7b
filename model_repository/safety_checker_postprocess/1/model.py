"""Postprocessor: applies the checker's thresholds to the embedder's cosines.

Every request of a dynamic batch is scored in one vectorised pass. A request
whose pixels held NaN or Inf is refused with INVALID_ARG: in the reference such
an image silently comes out "safe", and a guardrail must fail closed.

Besides the built-in concepts (1/concepts.json, written by the export) it
scores the operator's custom concepts (1/custom_concepts.json), re-read while
the server runs when the file changes (safety_checker_served.concept_watch).
Each execute() takes one snapshot for all of its requests, so a batch is
answered wholly under the old or wholly under the new set. A file the watcher
does not serve (invalid, older, unreadable, gone) leaves the last good set in
place and is counted in the counter safety_checker_concept_set_rejected_total.

Strictness: the config's `strictness` preset, or a request's `strictness`
(preset name) or `strictness_adjustment` (number) parameter, shifts every
threshold (safety_checker_served.scoring). Any other request parameter is
refused with INVALID_ARG (request_limits), so a mistyped name never falls back
to the default strictness.

The concept file is bounded as concept_set says (number of concepts, file
size; a larger file is not even read), and so is every log line about it.

An unexpected error while scoring a batch fails only the request it comes
from: the batch is then answered request by request, and a request that
still fails gets INTERNAL with a message that names no path, exception or
value (the log names the exception's type).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from safety_checker_served import concept_set
from safety_checker_served.concept_watch import ConceptFileError, CustomConceptFile
from safety_checker_served.model_config import ModelConfig
from safety_checker_served.request_failure import failed_request
from safety_checker_served.request_limits import RequestLimits
from safety_checker_served.scoring import certain, cosines, nonfinite_refusal, score_all
from safety_checker_served.strictness import Strictness


class TritonPythonModel:
    def initialize(self, args):
        config = ModelConfig(args)
        parameters = config.parameters
        version_dir = config.version_dir
        # Tensor names come from the config, by position: the order export/models.py declares.
        *self.inputs, self.cosine_bound = config.inputs
        self.concept_cosines, self.special_cosines, self.nonfinite_values, self.image_embeds = self.inputs
        (
            self.flag,
            self.concept_scores,
            self.special_scores,
            self.fired,
            self.custom_scores,
            self.custom_cosines,
            self.set_version,
            self.strictness_adjustment,
            self.exact_scores,
            self.decision_certain,
        ) = config.outputs
        # The error bound of the cosines when a request does not send its own (the optional last input).
        self.default_bound = float(parameters["cosine_bound"])
        self.limits = RequestLimits(parameters)
        for name in (parameters["strictness_parameter"], parameters["strictness_adjustment_parameter"]):
            if name not in self.limits.accepted:
                raise pb_utils.TritonModelException(f"config parameter request_parameters does not list {name!r}")

        with open(os.path.join(version_dir, parameters["concepts_file"])) as handle:
            metadata = json.load(handle)
        self.concept_thresholds = np.array([c["threshold"] for c in metadata["concepts"]], dtype=np.float64)
        self.special_thresholds = np.array([c["threshold"] for c in metadata["special_care"]], dtype=np.float64)
        self.concept_names = [c["name"] for c in metadata["concepts"]]
        self.special_names = [c["name"] for c in metadata["special_care"]]
        self.adjustment = float(metadata["special_care_adjustment"])
        for output, thresholds in (
            (self.concept_scores, self.concept_thresholds),
            (self.special_scores, self.special_thresholds),
        ):
            if config.dims(output)[-1] != len(thresholds):
                raise pb_utils.TritonModelException(
                    f"{parameters['concepts_file']} holds {len(thresholds)} thresholds for {output}, "
                    f"the config declares {config.dims(output)[-1]}"
                )

        self.strictness = Strictness(parameters)
        preset = parameters.get("strictness", "normal").strip().lower()
        if preset not in self.strictness.presets:
            raise pb_utils.TritonModelException(
                f"config parameter strictness: unknown preset {preset!r} (one of {', '.join(self.strictness.presets)})"
            )
        self.default_strictness = self.strictness.presets[preset]

        embedding_dim = int(config.raw["input"][self.inputs.index(self.image_embeds)]["dims"][-1])
        # A folder every replica shares (a ConfigMap volume on Kubernetes), or else the version folder.
        concepts_dir = parameters.get("custom_concepts_dir") or version_dir
        path = os.path.join(concepts_dir, parameters["custom_concepts_file"])
        # Kept on self: a MetricFamily must outlive its Metrics.
        self.family = pb_utils.MetricFamily(
            name="safety_checker_concept_set_rejected_total",
            description="Custom concept files looked at and not served (invalid, not newer, unreadable or gone); "
            "the last good set stayed in service",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.rejected = self.family.Metric(labels={})
        try:
            self.custom = CustomConceptFile(
                path, embedding_dim, pb_utils.Logger, on_reject=lambda reason: self.rejected.increment(1)
            )
        except ConceptFileError as error:
            raise pb_utils.TritonModelException(str(error)) from None
        pb_utils.Logger.log_info(
            concept_set.bounded(
                f"strictness preset {preset!r} (adjustment {self.default_strictness:+g}); "
                f"custom concept set version {self.custom.snapshot.version} "
                f"({len(self.custom.snapshot.names)} concepts: {concept_set.listing(self.custom.snapshot.names)})"
            )
        )

    def execute(self, requests):
        custom = self.custom.refresh()  # one snapshot for every request of this batch
        try:
            return self._scored(requests, custom)
        except Exception:  # ours, not a request's: each request alone, so that it fails only the one it is in
            return [self._alone(request, custom) for request in requests]

    def _alone(self, request, custom):
        try:
            (response,) = self._scored([request], custom)
            return response
        except Exception as error:
            return failed_request("scoring a request", error)

    def _scored(self, requests, custom):
        """Every request's response, the batch scored in one vectorised pass."""
        gathered = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        sizes = [len(g[0]) for g in gathered]
        concept_cos, special_cos, nonfinite, embeds = (np.concatenate(columns) for columns in zip(*gathered))
        strictness, errors = [], []
        for request in requests:
            value, error = self._strictness(request)
            strictness.append(value)
            errors.append(error)
        per_image = np.repeat(np.array(strictness, dtype=np.float64), sizes)
        bounds = np.concatenate([self._bound(r, n) for r, n in zip(requests, sizes)])
        custom_cos = cosines(embeds, custom.unit_embeddings)
        # What the scores and their certainty are both computed from.
        margins_of = (
            concept_cos,
            special_cos,
            self.concept_thresholds,
            self.special_thresholds,
            self.adjustment,
            per_image,
            custom_cos,
            custom.thresholds,
        )
        scores = score_all(*margins_of)
        sure = certain(*margins_of, bounds)

        responses = []
        start = 0
        for size, error in zip(sizes, errors):
            end = start + size
            if error is None:
                error = _refusal(
                    nonfinite[start:end], concept_cos[start:end], special_cos[start:end], custom_cos[start:end]
                )
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(self._response(scores, custom, custom_cos, per_image, bounds, sure, start, end))
            start = end
        return responses

    def _bound(self, request, size):
        """float64 [size]: the request's cosine error bound per image, or the config's."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.cosine_bound)
        if tensor is None:
            return np.full(size, self.default_bound)
        bound = tensor.as_numpy().astype(np.float64).reshape(-1)
        return np.where(np.isfinite(bound) & (bound >= 0), bound, np.inf)  # a nonsense bound is never sure

    def _response(self, scores, custom, custom_cos, per_image, bounds, sure, start, end):
        fired, custom_scores, custom_cosines = [], [], []
        for i in range(start, end):
            names = [n for n, s in zip(self.concept_names, scores.concept_scores[i]) if s > 0]
            names += [n for n, s in zip(self.special_names, scores.special_scores[i]) if s > 0]
            names += [n for n, s in zip(custom.names, scores.custom_scores[i]) if s > 0]
            fired.append(_json(names))
            custom_scores.append(
                _json({n: round(float(s), 3) + 0.0 for n, s in zip(custom.names, scores.custom_scores[i])})
            )
            custom_cosines.append(_json({n: float(str(c)) for n, c in zip(custom.names, custom_cos[i])}))
        count = end - start
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(self.flag, scores.flagged[start:end].reshape(-1, 1)),
                pb_utils.Tensor(self.concept_scores, scores.concept_scores[start:end].astype(np.float32)),
                pb_utils.Tensor(self.special_scores, scores.special_scores[start:end].astype(np.float32)),
                pb_utils.Tensor(self.fired, np.array(fired, dtype=object).reshape(-1, 1)),
                pb_utils.Tensor(self.custom_scores, np.array(custom_scores, dtype=object).reshape(-1, 1)),
                pb_utils.Tensor(self.custom_cosines, np.array(custom_cosines, dtype=object).reshape(-1, 1)),
                pb_utils.Tensor(self.set_version, np.full((count, 1), custom.version, dtype=np.int64)),
                pb_utils.Tensor(self.strictness_adjustment, per_image[start:end].reshape(-1, 1).copy()),
                # Exact: fp32 cosines (bound 0). Certain: no cosine within the bound changes a decision.
                pb_utils.Tensor(self.exact_scores, (bounds[start:end] == 0).reshape(-1, 1)),
                pb_utils.Tensor(self.decision_certain, sure[start:end].reshape(-1, 1).copy()),
            ]
        )

    def _strictness(self, request):
        """(adjustment, None) for this request, or (default, TritonError) naming the bad parameter."""
        _, error = self.limits.parameters(request.parameters())
        if error is None:
            count = len(pb_utils.get_input_tensor_by_name(request, self.inputs[0]).as_numpy())
            error = self.limits.images(count)
        if error is not None:
            return self.default_strictness, _invalid(error)
        value, problem = self.strictness.of(request.parameters())
        if problem is not None:
            return self.default_strictness, _invalid(problem)
        return (self.default_strictness if value is None else value), None


def _json(value):
    return json.dumps(value, separators=(",", ":")).encode()


def _invalid(message):
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)


def _refusal(nonfinite, concept_cos, special_cos, custom_cos):
    """The error for a request that must not get a decision, or None."""
    refusal = nonfinite_refusal(nonfinite)
    if refusal is not None:
        return _invalid(refusal)
    if not (np.all(np.isfinite(concept_cos)) and np.all(np.isfinite(special_cos)) and np.all(np.isfinite(custom_cos))):
        return pb_utils.TritonError("the embedder returned non-finite cosines; nothing in this request was checked")
    return None
