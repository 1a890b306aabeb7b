"""Postprocessor: applies the checker's thresholds to the embedder's cosines.

Every request of a dynamic batch is scored in one vectorised pass. A request
whose pixels held NaN or Inf is refused with INVALID_ARG: in the reference such
an image silently comes out "safe", and a guardrail must fail closed.

Besides the built-in concepts (1/concepts.json, written by the export) it
scores the operator's custom concepts (1/custom_concepts.json). That file is
re-read while the server runs: execute() stats it first (cheap) and, when its
inode, size or modification time changed, parses and validates it; a valid,
newer set replaces the served one in one assignment, an invalid one is logged
and ignored. Each execute() takes one snapshot for all of its requests, so a
batch is answered wholly under the old or wholly under the new set.

Strictness: the config's `strictness` preset, or a request's `strictness`
(preset name) or `strictness_adjustment` (number) parameter, shifts every
threshold; see scoring.py. Any other request parameter is refused with
INVALID_ARG (request_limits.py), so a mistyped name never falls back to the
default strictness.

The concept file is bounded as concept_set.py says (number of concepts, file
size; a larger file is not even read), and so is every log line about it.
"""

import json
import os
import sys
import time

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import concept_set
from request_limits import RequestLimits
from scoring import certain, cosines, score_all
from strictness import Strictness

# A file rejected while it was being written in place is looked at again for this long.
RECENT_WRITE_S = 2.0
RETRY_INTERVAL_S = 0.25


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        # Tensor names come from the config, by position: the order export/models.py declares.
        *self.inputs, self.cosine_bound = [i["name"] for i in config["input"]]
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
        ) = [o["name"] for o in config["output"]]
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
        widths = {o["name"]: int(o["dims"][-1]) for o in config["output"]}
        for output, thresholds in (
            (self.concept_scores, self.concept_thresholds),
            (self.special_scores, self.special_thresholds),
        ):
            if widths[output] != len(thresholds):
                raise pb_utils.TritonModelException(
                    f"{parameters['concepts_file']} holds {len(thresholds)} thresholds for {output}, "
                    f"the config declares {widths[output]}"
                )

        self.strictness = Strictness(parameters)
        preset = parameters.get("strictness", "normal").strip().lower()
        if preset not in self.strictness.presets:
            raise pb_utils.TritonModelException(
                f"config parameter strictness: unknown preset {preset!r} (one of {', '.join(self.strictness.presets)})"
            )
        self.default_strictness = self.strictness.presets[preset]

        embedding_dim = int(config["input"][self.inputs.index(self.image_embeds)]["dims"][-1])
        # A folder every replica shares (a ConfigMap volume on Kubernetes), or else the version folder.
        concepts_dir = parameters.get("custom_concepts_dir") or version_dir
        path = os.path.join(concepts_dir, parameters["custom_concepts_file"])
        self.custom = CustomConceptFile(path, embedding_dim)
        pb_utils.Logger.log_info(
            concept_set.bounded(
                f"strictness preset {preset!r} (adjustment {self.default_strictness:+g}); "
                f"custom concept set version {self.custom.snapshot.version} "
                f"({len(self.custom.snapshot.names)} concepts: {concept_set.listing(self.custom.snapshot.names)})"
            )
        )

    def execute(self, requests):
        custom = self.custom.refresh()  # one snapshot for every request of this batch
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


class Snapshot:
    """One validated custom concept set, in the form execute() uses."""

    def __init__(self, concepts):
        self.concepts = concepts
        self.version = concepts.version
        self.names = concepts.names
        self.unit_embeddings = concepts.unit_embeddings()
        self.thresholds = concepts.thresholds()


class CustomConceptFile:
    """The custom concept file, re-read when it changes; `snapshot` is what is served."""

    def __init__(self, path, embedding_dim):
        self.path = path
        self.embedding_dim = embedding_dim
        self.seen = None  # (device, inode, size, mtime_ns) of the file last looked at
        self.rejected = None  # the message of the last rejected file, while it is the one on disk
        self.last_try = 0.0
        self.missing_logged = False
        if not os.path.exists(path):
            # A repository exported before custom concepts existed: serve none until a file appears.
            pb_utils.Logger.log_warn(f"no custom concept set at {path}; serving none (version 0)")
            self.snapshot = Snapshot(concept_set.empty(embedding_dim))
            return
        try:
            with open(path, "rb") as handle:
                self.seen = _signature(os.fstat(handle.fileno()))
                text = concept_set.read_limited(handle, path)
            loaded = concept_set.parse(text, embedding_dim=embedding_dim, origin=path)
        except (OSError, concept_set.ConceptSetError) as error:
            # Fail closed: without a last valid set there is nothing safe to serve.
            raise pb_utils.TritonModelException(f"custom concept set rejected: {error}") from None
        self.snapshot = Snapshot(loaded)

    def refresh(self):
        try:
            stat = os.stat(self.path)
        except OSError:
            if not self.missing_logged:
                pb_utils.Logger.log_warn(
                    f"custom concept set {self.path} is missing; still serving version {self.snapshot.version}"
                )
                self.missing_logged = True
            self.seen = None
            return self.snapshot
        self.missing_logged = False
        signature = _signature(stat)
        if signature == self.seen and not self._retry(stat):
            return self.snapshot
        self.last_try = time.monotonic()
        try:
            with open(self.path, "rb") as handle:
                signature = _signature(os.fstat(handle.fileno()))
                text = concept_set.read_limited(handle, self.path)
            loaded = concept_set.parse(text, embedding_dim=self.embedding_dim, origin=self.path)
            served = self.snapshot.concepts
            if loaded.version <= served.version and not (
                loaded.version == served.version and loaded.same_concepts(served)
            ):
                raise concept_set.ConceptSetError(
                    f"{self.path}: version {loaded.version} is not newer than the served version "
                    f'{served.version}; every change must increase "version"'
                )
        except (OSError, concept_set.ConceptSetError) as error:
            self.seen = signature
            message = concept_set.bounded(
                f"custom concept set rejected, still serving version {self.snapshot.version}: {error}"
            )
            if message != self.rejected:
                pb_utils.Logger.log_error(message)
            self.rejected = message
            return self.snapshot
        self.seen = signature
        if self.rejected is not None:
            self.rejected = None
            if loaded.version == self.snapshot.version:
                pb_utils.Logger.log_info(f"custom concept set {self.path} is valid again (version {loaded.version})")
        if loaded.version != self.snapshot.version:
            self.snapshot = Snapshot(loaded)  # one assignment: the next execute() sees all of it
            pb_utils.Logger.log_info(
                concept_set.bounded(
                    f"custom concept set version {loaded.version} loaded: {len(loaded.concepts)} concepts "
                    f"({concept_set.listing(loaded.names)})"
                )
            )
        return self.snapshot

    def _retry(self, stat):
        """A rejected file written moments ago may have been caught half-written in place: look again."""
        return (
            self.rejected is not None
            and time.time() - stat.st_mtime < RECENT_WRITE_S
            and time.monotonic() - self.last_try > RETRY_INTERVAL_S
        )


def _signature(stat):
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _json(value):
    return json.dumps(value, separators=(",", ":")).encode()


def _invalid(message):
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)


def _refusal(nonfinite, concept_cos, special_cos, custom_cos):
    """The error for a request that must not get a decision, or None."""
    counts = nonfinite.reshape(-1)
    if np.any(counts > 0):
        bad = np.flatnonzero(counts)
        detail = ", ".join(f"image {i}: {counts[i]}" for i in bad[:8])
        return pb_utils.TritonError(
            f"pixel_values holds non-finite values (NaN or Inf) ({detail}); nothing in this request was checked",
            pb_utils.TritonError.INVALID_ARG,
        )
    if not (np.all(np.isfinite(concept_cos)) and np.all(np.isfinite(special_cos)) and np.all(np.isfinite(custom_cos))):
        return pb_utils.TritonError("the embedder returned non-finite cosines; nothing in this request was checked")
    return None
