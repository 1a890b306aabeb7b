"""A thin client for the served `safety_checker` ensembles, over gRPC or HTTP.

It only ever returns a result for an image the server actually answered: any transport or server error is a
`CheckError`, so a caller cannot mistake a failure for a "not flagged".

A request whose server failed (`CheckError.retryable`) is sent again, after 0.25 s, 0.5 s, 1 s ... (at most 5 s, with
jitter), until the deadline; then its images count as not checked. While no connection can be made to a server that
never answered (a wrong address), the client gives up `connect_deadline_s` after its first attempt: a typo fails in
seconds, a server that answered before is waited for through a restart. A request refused for what it holds is never
sent again as it was: `check_each` leaves out the image a refusal names, or splits the batch in halves.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import re
import string
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from safety_checker_client import spec
from safety_checker_client.errors import INTERNAL, UNAVAILABLE, CheckError
from safety_checker_client.preprocess import ImageError, ImageLike, load_image, preprocess, preprocess_uint8
from safety_checker_client.strictness import Strictness, StrictnessError, request_parameters

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
PROTOCOLS = tuple(DEFAULT_URLS)
CONNECT_DEADLINE_S = 20.0  # how long a server that has not answered yet is tried while nothing listens

# Retries: the first wait, its growth and its cap (each wait is drawn between half and all of it).
RETRY_FIRST_WAIT_S, RETRY_GROWTH, RETRY_MAX_WAIT_S = 0.25, 2.0, 5.0
# Bytes of a text file, and of base64 text in lines; `read_file` refuses a file of the first but not the second.
_TEXT = bytes(range(0x20, 0x7F)) + b"\t\n\r\x0b\x0c"
_BASE64_LINES = (string.ascii_letters + string.digits + "+/=\r\n").encode()

# What a record shows of an answer, in its order (CheckResult.as_dict, `check`'s lines, scan's report).
ANSWER_FIELDS = ("flagged", "fired_concepts", "concept_scores", "special_scores", "custom_scores")
ANSWER_FIELDS += ("concept_set_version", "strictness_adjustment", "exact_scores", "view")
ALL_OUTPUTS = tuple(t.name for t in spec.IMAGES_OUTPUTS)  # the pixel ensembles answer all but `view`
# The outputs a record needs: all but the embedding and the raw cosines (most of an answer's bytes).
RECORD_OUTPUTS = tuple(n for n in ALL_OUTPUTS if n not in (spec.IMAGE_EMBEDS.name, spec.CUSTOM_COSINES.name))


@dataclass
class CheckResult:
    """The answer for one image; a field whose output was not requested is None."""

    flagged: bool  # a built-in concept or a custom concept fired
    concept_scores: Optional[List[float]] = None
    special_scores: Optional[List[float]] = None
    image_embeds: Optional[np.ndarray] = field(default=None, repr=False)
    custom_scores: Optional[Dict[str, float]] = None  # custom concept name -> score
    fired_concepts: Optional[List[str]] = None  # every concept whose score is > 0
    concept_set_version: Optional[int] = None  # the custom concept set that answered
    strictness_adjustment: Optional[float] = None  # what every threshold was shifted by
    custom_cosines: Optional[Dict[str, float]] = field(default=None, repr=False)
    # False: answered from an int8 embedder whose error bound cannot change this decision (scores within it).
    exact_scores: Optional[bool] = None
    view: Optional[Dict[str, object]] = None  # an image file's: which of its frames and views answered

    def as_dict(self) -> Dict[str, object]:
        """The JSON-ready view (without the embedding and the raw cosines), in ANSWER_FIELDS order."""
        return {name: getattr(self, name) for name in ANSWER_FIELDS if getattr(self, name) is not None}


Outcome = Union[CheckResult, CheckError]  # one image's answer, or why it has none


def triton_module(protocol: str):
    """tritonclient.grpc or tritonclient.http, imported on demand."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}")


def server_address(url: str) -> str:
    """HOST:PORT as tritonclient takes it, from a url as a user may paste it: "http://" or "https://" and a trailing "/"
    are dropped (the client speaks plain HTTP or gRPC); another scheme, a path or no port is a ValueError."""
    scheme, separator, address = url.strip().rpartition("://")
    if separator and scheme.lower() not in ("http", "https"):
        raise ValueError(f"url {url!r}: only http:// or https:// may come before HOST:PORT")
    address = address.rstrip("/")
    host_port = re.fullmatch(r"[^\s/]+:([0-9]{1,5})", address)
    if host_port is None or not 0 < int(host_port.group(1)) < 65536:
        raise ValueError(f"url {url!r} must be HOST:PORT (a port in 1-65535, no path)")
    return address


class SafetyCheckerClient:
    """Sends image batches to the checker, split at `max_batch_size` (default: the contract's).

    By default it sends float32 `pixel_values` to `safety_checker`; with `uint8=True` uint8 images to
    `safety_checker_uint8` (a quarter of the bytes); with `encoded=True` image files as they are to
    `safety_checker_images`, which decodes them. The same decisions in every form.

    `url`: HOST:PORT, http(s):// allowed. `outputs`: the outputs to request (default: all; `check`, scan and the
    drop-in ask for RECORD_OUTPUTS), `has_nsfw_concepts` always. `warn` hears at once of a failure that will be retried
    (once until an answer). `monotonic`, `sleep`, `rng` pace the retries; `triton` stands in for tritonclient."""

    def __init__(
        self,
        url: Optional[str] = None,
        protocol: str = "grpc",
        model_name: Optional[str] = None,
        timeout_s: Optional[float] = 120.0,
        uint8: bool = False,
        encoded: bool = False,
        deadline_s: Optional[float] = None,
        max_batch_size: Optional[int] = None,
        outputs: Optional[Sequence[str]] = None,
        connect_deadline_s: float = CONNECT_DEADLINE_S,
        warn: Optional[Callable[[str], None]] = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Optional[random.Random] = None,
        triton=None,
    ) -> None:
        """`timeout_s`: how long one attempt may take. `deadline_s`: how long a request may take, retries included,
        before its images count as not checked (default: `timeout_s`; 0 sends each request once). `connect_deadline_s`:
        the shorter one while no connection can be made to a server not reached yet."""
        if uint8 and encoded:
            raise ValueError("choose one input form: uint8=True or encoded=True")
        unknown = sorted(set(outputs or ()) - set(ALL_OUTPUTS))
        if unknown:
            raise ValueError(f"unknown outputs {unknown}; the ensemble's are {list(ALL_OUTPUTS)}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        self.protocol = protocol
        self._triton = triton or triton_module(protocol)
        self.url = server_address(url or DEFAULT_URLS[protocol])
        self.uint8, self.encoded = uint8, encoded
        if encoded:
            self.input, default_model = spec.IMAGE, spec.IMAGES_MODEL
        elif uint8:
            self.input, default_model = spec.IMAGES, spec.UINT8_ENSEMBLE_MODEL
        else:
            self.input, default_model = spec.PIXEL_VALUES, spec.ENSEMBLE_MODEL
        self.model_name = model_name or default_model
        self.where = f"{self.model_name} at {self.url} ({protocol})"  # what its errors start with
        self.max_batch_size = max_batch_size or spec.MAX_BATCH_SIZE
        requested = set(outputs or ALL_OUTPUTS) | {spec.HAS_NSFW_CONCEPTS.name}
        served = spec.IMAGES_OUTPUTS if encoded else spec.ENSEMBLE_OUTPUTS
        self.outputs = tuple(t.name for t in served if t.name in requested)
        self.timeout_s, self.deadline_s = timeout_s, timeout_s if deadline_s is None else deadline_s
        self.connect_deadline_s, self._warn = connect_deadline_s, warn
        self._monotonic, self._sleep, self._rng = monotonic, sleep, rng or random.Random()
        self.attempts = 0  # requests sent so far, retries included
        # When the first request was sent; whether a server answered (anything); `warn` was told since the last answer.
        self._first_attempt, self._reached, self._warned = float("inf"), False, False
        self._client = self._connect()

    def _connect(self):
        timeout = {"network_timeout": self.timeout_s, "connection_timeout": self.timeout_s}
        return self._triton.InferenceServerClient(self.url, **(timeout if self.protocol == "http" else {}))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SafetyCheckerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _infer(self, *args, retry_internal: bool = True, **kwargs):
        """tritonclient's infer, sent again while the server fails, until the deadline; an internal error is raised at
        once unless `retry_internal` (check_each splits a batch instead of sending it whole again)."""
        started, wait, tries = self._monotonic(), RETRY_FIRST_WAIT_S, 0
        self._first_attempt = min(self._first_attempt, started)
        while True:
            tries += 1
            self.attempts += 1
            try:
                result = self._client.infer(*args, **kwargs)
                self._reached, self._warned = True, False
                return result
            except Exception as exc:  # connection refused, timeouts: tritonclient raises several types
                error = CheckError.from_exception(exc, self.where)
                self._reached = self._reached or not error.unreachable
                if not error.retryable or (error.kind == INTERNAL and not retry_internal):
                    raise error from exc
                since, budget = started, self.deadline_s or 0.0
                if error.unreachable and not self._reached:  # nothing listens there, perhaps never will
                    since, budget = self._first_attempt, min(budget, self.connect_deadline_s)
                pause = wait * self._rng.uniform(0.5, 1.0)
                now = self._monotonic()
                if now - since + pause >= budget:
                    if tries > 1:
                        note = f"not checked: {tries} attempts in {now - started:.1f} s"
                        error = CheckError(f"{error} ({note})", error.kind, unreachable=error.unreachable)
                    raise error from exc
                if self._warn is not None and not self._warned:
                    self._warned = True
                    reach = "cannot reach " if error.unreachable else ""
                    self._warn(f"{reach}{error}; retrying for up to {budget - (now - since):.0f} s")
            self._sleep(pause)
            wait = min(wait * RETRY_GROWTH, RETRY_MAX_WAIT_S)
            with contextlib.suppress(Exception):  # a fresh connection: the old one may lead to a server that is gone
                self._client.close()
            self._client = self._connect()

    def preprocess(self, images: Sequence[ImageLike], value_range: Tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        """The batch this client sends for `images`: uint8 images or float32 pixel_values."""
        if self.encoded:
            raise ValueError("encoded=True sends files as they are: use check_files(paths) or check_encoded(files)")
        return (preprocess_uint8 if self.uint8 else preprocess)(images, value_range=value_range)

    def _parameters(self, strictness: Strictness) -> Optional[Dict[str, object]]:
        """The request parameters; a choice the server would refuse is refused here, in its words."""
        try:
            return request_parameters(strictness)
        except StrictnessError as error:
            raise CheckError.from_exception(error, self.where) from error

    def infer(self, batch: np.ndarray, strictness: Strictness = None) -> Dict[str, np.ndarray]:
        """The requested outputs for a batch, in requests of max_batch_size; any failed request fails the call.

        The batch is float32 pixel_values [N, 3, 224, 224] (other float dtypes are cast), uint8 images [N, 224, 224, 3]
        (`uint8=True`), or image files (`encoded=True`): bytes, or an object array of them."""
        batch, parameters, size = self._checked(batch), self._parameters(strictness), self.max_batch_size
        chunks = [self._infer_once(batch[i : i + size], parameters) for i in range(0, len(batch), size)]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def check_each(self, batch: np.ndarray, strictness: Strictness = None) -> List[Outcome]:
        """One outcome per image of a batch (see `infer`): its CheckResult or its CheckError.

        A request refused for one image (a refusal naming its index) is sent again without it; one that failed otherwise
        (a refusal naming no image, an internal error) is sent again as two halves, and so on down to one image, whose
        failure is its own. An unavailable server is not split: the images it left unanswered share its error (each half
        would wait for it until the deadline again)."""
        batch = self._checked(batch)
        try:
            parameters = self._parameters(strictness)
        except CheckError as error:
            return [error] * len(batch)
        outcomes: List[Optional[Outcome]] = [None] * len(batch)
        size = self.max_batch_size
        parts = [list(range(start, min(start + size, len(batch)))) for start in range(0, len(batch), size)]
        while parts:
            part = parts.pop(0)
            try:
                answer = self._infer_once(batch[part], parameters, retry_internal=len(part) == 1)
            except CheckError as error:
                named = error.index is not None and 0 <= error.index < len(part)
                if error.kind == UNAVAILABLE:
                    return [error if outcome is None else outcome for outcome in outcomes]
                if named or len(part) == 1:
                    outcomes[part.pop(error.index if named else 0)] = error
                    parts[:0] = [part] if part else []
                else:
                    parts[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                continue
            for k, i in enumerate(part):
                outcomes[i] = result_from(answer, k)
        return outcomes  # type: ignore[return-value]

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        if self.encoded:
            return _encoded_batch(batch)
        expected = tuple(self.input.dims)
        if self.uint8 and batch.dtype != np.uint8:
            raise ValueError(f"{self.input.name} must be uint8, got {batch.dtype}")
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(
                f"{self.input.name} must have shape [N, {', '.join(map(str, expected))}], got {list(batch.shape)}"
            )
        if len(batch) == 0:
            raise ValueError("no images to check")
        return np.ascontiguousarray(batch, dtype=np.uint8 if self.uint8 else np.float32)

    def _infer_once(self, batch: np.ndarray, parameters: Optional[dict], retry_internal=True) -> Dict[str, np.ndarray]:
        tensor = self._triton.InferInput(self.input.name, list(batch.shape), self.input.datatype)
        tensor.set_data_from_numpy(batch)  # over HTTP as binary data (tritonclient's default), not base64 in JSON
        outputs = [self._triton.InferRequestedOutput(name) for name in self.outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        if parameters:
            kwargs["parameters"] = parameters
        result = self._infer(self.model_name, [tensor], outputs=outputs, retry_internal=retry_internal, **kwargs)
        answer = {name: result.as_numpy(name) for name in self.outputs}
        for name, value in answer.items():
            if value is None or len(value) != len(batch):
                count = 0 if value is None else len(value)
                raise CheckError(f"{self.where}: answered {name} for {count} of {len(batch)} images", INTERNAL)
        return answer

    def check_batch(self, batch: np.ndarray, strictness: Strictness = None) -> List[CheckResult]:
        """One result per image of a batch in the client's input form (see `infer`); any failure raises."""
        answer = self.infer(batch, strictness)
        return [result_from(answer, i) for i in range(len(answer[spec.HAS_NSFW_CONCEPTS.name]))]

    def check(
        self, images: Sequence[ImageLike], value_range: Tuple[float, float] = (0.0, 1.0), strictness: Strictness = None
    ) -> List[CheckResult]:
        """Check images (PIL, uint8 arrays or float arrays in `value_range`), one result each, in order."""
        return self.check_batch(self.preprocess(images, value_range), strictness)

    def check_encoded(self, files: Sequence[bytes], strictness: Strictness = None) -> List[CheckResult]:
        """Check image files given as their bytes (PNG, JPEG, ...), sent untouched (`encoded=True`), in order; a batch
        the server refuses is split as in `check_each`, and the first file left without an answer raises."""
        if not self.encoded:
            raise ValueError("check_encoded sends image files: create the client with encoded=True")
        return _every_answer(self.check_each(_encoded_batch(files), strictness))

    def check_files(self, paths: Sequence[Union[str, os.PathLike]], strictness: Strictness = None) -> List[CheckResult]:
        """Check image files, one result each, in order.

        With `encoded=True` the server decodes each file's bytes (as `check_encoded`), otherwise this client does. A
        file that cannot be read raises ImageError; one left without an answer, a CheckError naming it."""
        if not self.encoded:
            return self.check([load_image(path) for path in paths], strictness=strictness)
        return _every_answer(self.check_each(_encoded_batch([read_file(path) for path in paths]), strictness), paths)


def _every_answer(outcomes: List[Outcome], paths: Optional[Sequence[Union[str, os.PathLike]]] = None) -> list:
    """The results of `check_each`, or the first image's error (naming its file, given `paths`)."""
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, CheckError):
            if paths is None:
                raise outcome
            raise CheckError(f"{os.fspath(paths[i])}: {outcome}", outcome.kind, outcome.index) from outcome
    return outcomes


def read_file(path: Union[str, os.PathLike]) -> bytes:
    """An image file's bytes, untouched; ImageError if it cannot be read, or if it is text that is not base64 (the
    server takes a text element for base64 and would only call it invalid base64)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ImageError(f"cannot read image file {os.fspath(path)!r}: {error.strerror or error}") from error
    if not data.translate(None, _TEXT) and data.translate(None, _BASE64_LINES):
        formats = ", ".join(spec.IMAGE_FORMATS)
        raise ImageError(f"cannot check {os.fspath(path)!r}: a text file, not an image file ({formats})")
    return data


def _encoded_batch(files: Union[Sequence[bytes], np.ndarray]) -> np.ndarray:
    """Image files as the BYTES tensor [N, 1] of safety_checker_images."""
    if isinstance(files, (bytes, bytearray)):
        raise ValueError("expected a sequence of image files (bytes), not one bytes object")
    array = np.empty((len(files), 1), dtype=object)
    for i, data in enumerate(np.asarray(files, dtype=object).reshape(-1) if isinstance(files, np.ndarray) else files):
        if not isinstance(data, (bytes, bytearray, np.bytes_)):
            raise ValueError(f"image file {i} must be bytes, not {type(data).__name__}")
        array[i, 0] = bytes(data)
    if len(array) == 0:
        raise ValueError("no images to check")
    return array


def result_from(answer: Dict[str, np.ndarray], i: int) -> CheckResult:
    """Image i of an ensemble answer (the output tensors by name) as a CheckResult; absent outputs are None."""

    def get(tensor: spec.TensorSpec, convert: Callable[[np.ndarray], object]):
        return convert(answer[tensor.name][i]) if tensor.name in answer else None

    return CheckResult(
        flagged=bool(answer[spec.HAS_NSFW_CONCEPTS.name][i].reshape(-1)[0]),
        concept_scores=get(spec.CONCEPT_SCORES, _thousandths),
        special_scores=get(spec.SPECIAL_SCORES, _thousandths),
        image_embeds=get(spec.IMAGE_EMBEDS, lambda value: value),
        custom_scores=get(spec.CUSTOM_SCORES, _json_text),
        fired_concepts=get(spec.FIRED_CONCEPTS, _json_text),
        concept_set_version=get(spec.CONCEPT_SET_VERSION, lambda value: int(value.reshape(-1)[0])),
        strictness_adjustment=get(spec.STRICTNESS_ADJUSTMENT, lambda value: float(value.reshape(-1)[0])),
        custom_cosines=get(spec.CUSTOM_COSINES, _json_text),
        exact_scores=get(spec.EXACT_SCORES, lambda value: bool(value.reshape(-1)[0])),
        view=get(spec.VIEW, _json_text),
    )


def _json_text(value: np.ndarray):
    """A BYTES output element holding JSON text."""
    item = value.reshape(-1)[0]
    return json.loads(item.decode() if isinstance(item, bytes) else item)


def _thousandths(scores: np.ndarray) -> List[float]:
    """Scores are multiples of 0.001 sent as float32; give back the exact decimals diffusers reports."""
    return [round(float(s), 3) for s in scores]
