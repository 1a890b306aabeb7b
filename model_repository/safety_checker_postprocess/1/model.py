"""Postprocessor: applies the checker's thresholds to the embedder's cosines.

Every request of a dynamic batch is scored in one vectorised pass. A request
whose pixels held NaN or Inf is refused with INVALID_ARG: in the reference such
an image silently comes out "safe", and a guardrail must fail closed.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scoring import score  # noqa: E402

CONCEPTS_FILENAME = "concepts.json"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], CONCEPTS_FILENAME)
        with open(path) as handle:
            metadata = json.load(handle)
        self.concept_thresholds = np.array([c["threshold"] for c in metadata["concepts"]], dtype=np.float64)
        self.special_thresholds = np.array([c["threshold"] for c in metadata["special_care"]], dtype=np.float64)
        self.adjustment = float(metadata["special_care_adjustment"])

        self.inputs = [i["name"] for i in config["input"]]
        self.concept_input, self.special_input, self.nonfinite_input = self.inputs
        # The rendered config lists the outputs as decision, concept scores, special-care scores.
        outputs = {o["name"]: o for o in config["output"]}
        self.flag_output, self.concept_output, self.special_output = outputs
        for output, thresholds in ((self.concept_output, self.concept_thresholds),
                                   (self.special_output, self.special_thresholds)):
            width = int(outputs[output]["dims"][-1])
            if width != len(thresholds):
                raise pb_utils.TritonModelException(
                    f"{CONCEPTS_FILENAME} holds {len(thresholds)} thresholds for {output}, "
                    f"the config declares {width}"
                )

    def execute(self, requests):
        gathered = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs]
                    for r in requests]
        concept_cos, special_cos, nonfinite = (np.concatenate(columns) for columns in zip(*gathered))
        flagged, concept_scores, special_scores = score(
            concept_cos, special_cos, self.concept_thresholds, self.special_thresholds, self.adjustment
        )

        responses = []
        start = 0
        for request_inputs in gathered:
            end = start + len(request_inputs[0])
            error = _refusal(nonfinite[start:end], concept_cos[start:end], special_cos[start:end])
            if error is not None:
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(self.flag_output, flagged[start:end].reshape(-1, 1)),
                    pb_utils.Tensor(self.concept_output, concept_scores[start:end].astype(np.float32)),
                    pb_utils.Tensor(self.special_output, special_scores[start:end].astype(np.float32)),
                ]))
            start = end
        return responses


def _refusal(nonfinite, concept_cos, special_cos):
    """The error for a request that must not get a decision, or None."""
    counts = nonfinite.reshape(-1)
    if np.any(counts > 0):
        bad = np.flatnonzero(counts)
        detail = ", ".join(f"image {i}: {counts[i]}" for i in bad[:8])
        return pb_utils.TritonError(
            f"pixel_values holds non-finite values (NaN or Inf) ({detail}); nothing in this request was checked",
            pb_utils.TritonError.INVALID_ARG,
        )
    if not (np.all(np.isfinite(concept_cos)) and np.all(np.isfinite(special_cos))):
        return pb_utils.TritonError("the embedder returned non-finite cosines; nothing in this request was checked")
    return None
