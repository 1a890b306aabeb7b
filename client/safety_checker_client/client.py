"""A thin client for the served `safety_checker` ensemble, over gRPC or HTTP.

It only ever returns a result for an image the server actually answered: any
transport or server error raises, so a caller cannot mistake a failure for a
"not flagged".

A request whose server failed (it could not be reached, it dropped the
connection, it was overloaded or restarting: UNAVAILABLE, INTERNAL, a
timeout) is sent again, after 0.25 s, 0.5 s, 1 s ... (at most 5 s, with
jitter), until the deadline; then the images count as not checked
(CheckError). A request the server refused for what it holds (INVALID_ARG,
an unknown model) is never sent again.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from safety_checker_client import spec
from safety_checker_client.preprocess import ImageError, ImageLike, load_image, preprocess, preprocess_uint8

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
PROTOCOLS = tuple(DEFAULT_URLS)


class CheckError(RuntimeError):
    """The server did not answer; no image of the failed request was checked."""


# Retries: the first wait, its growth and its cap (each wait is drawn between half and all of it).
RETRY_FIRST_WAIT_S = 0.25
RETRY_GROWTH = 2.0
RETRY_MAX_WAIT_S = 5.0
# Statuses of a server that failed (tritonclient's: gRPC status names, HTTP codes); any other is final.
RETRYABLE_STATUSES = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.INTERNAL",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.UNKNOWN",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
    "500",
    "502",
    "503",
    "504",
}


def retryable(error: BaseException) -> bool:
    """Whether `error` says the server failed (send again) rather than that the request was wrong."""
    from tritonclient.utils import InferenceServerException

    if isinstance(error, InferenceServerException):
        # No status: tritonclient refused the request itself, before sending it.
        return str(error.status()) in RETRYABLE_STATUSES
    return True  # connection refused, reset, timeouts: tritonclient raises several types


Strictness = Union[str, float, None]
"""A preset name ("weak", "normal", ...), an adjustment in [-0.1, 0.1], or None for the server's preset."""


@dataclass
class CheckResult:
    """The answer for one image."""

    flagged: bool  # a built-in concept or a custom concept fired
    concept_scores: List[float]
    special_scores: List[float]
    image_embeds: np.ndarray = field(repr=False)
    custom_scores: Dict[str, float] = field(default_factory=dict)  # custom concept name -> score
    fired_concepts: List[str] = field(default_factory=list)  # every concept whose score is > 0
    concept_set_version: int = 0  # the custom concept set that answered
    strictness_adjustment: float = 0.0  # what every threshold was shifted by
    custom_cosines: Dict[str, float] = field(default_factory=dict, repr=False)
    # False: answered from an int8 embedder whose error bound cannot change this decision (scores within it).
    exact_scores: bool = True

    def as_dict(self) -> Dict[str, object]:
        """The JSON-ready view (without the embedding and the raw cosines)."""
        return {
            "flagged": self.flagged,
            "concept_scores": self.concept_scores,
            "special_scores": self.special_scores,
            "custom_scores": self.custom_scores,
            "fired_concepts": self.fired_concepts,
            "concept_set_version": self.concept_set_version,
            "strictness_adjustment": self.strictness_adjustment,
            "exact_scores": self.exact_scores,
        }


def request_parameters(strictness: Strictness) -> Optional[Dict[str, object]]:
    """The Triton request parameters that choose a strictness (None: the server's configured preset)."""
    if strictness is None:
        return None
    if isinstance(strictness, str):
        return {spec.STRICTNESS_PARAMETER: strictness}
    if isinstance(strictness, bool) or not isinstance(strictness, (int, float)):
        raise ValueError(f"strictness must be a preset name or a number, not {strictness!r}")
    if not math.isfinite(strictness):  # JSON cannot carry it; the server would refuse it anyway
        raise CheckError(
            f"request parameter {spec.STRICTNESS_ADJUSTMENT_PARAMETER!r} = {strictness!r} must be a "
            f"number in [-{spec.MAX_STRICTNESS_ADJUSTMENT:g}, {spec.MAX_STRICTNESS_ADJUSTMENT:g}]"
        )
    return {spec.STRICTNESS_ADJUSTMENT_PARAMETER: float(strictness)}


def triton_module(protocol: str):
    """tritonclient.grpc or tritonclient.http, imported on demand."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    return module


class SafetyCheckerClient:
    """Sends image batches to the checker, split to fit the served max_batch_size.

    By default it sends float32 `pixel_values` to `safety_checker`. With
    `uint8=True` it sends the resized and cropped uint8 images to
    `safety_checker_uint8`, which normalises them on the server: a quarter of
    the bytes on the wire, the same decisions. With `encoded=True` it sends
    image files as they are (`check_files`, `check_encoded`) to
    `safety_checker_images`, which decodes them with this package's own
    preprocessing: a JPEG stays a JPEG on the wire, the same decisions.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        protocol: str = "grpc",
        model_name: Optional[str] = None,
        timeout_s: Optional[float] = 120.0,
        uint8: bool = False,
        encoded: bool = False,
        deadline_s: Optional[float] = None,
    ) -> None:
        """`timeout_s`: how long one attempt may take. `deadline_s`: how long a request may take, retries
        included, before its images count as not checked (default: `timeout_s`; 0 sends each request once)."""
        if uint8 and encoded:
            raise ValueError("choose one input form: uint8=True or encoded=True")
        self.protocol = protocol
        self._triton = triton_module(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.uint8 = uint8
        self.encoded = encoded
        if encoded:
            self.input, default_model = spec.IMAGE, spec.IMAGES_MODEL
        elif uint8:
            self.input, default_model = spec.IMAGES, spec.UINT8_ENSEMBLE_MODEL
        else:
            self.input, default_model = spec.PIXEL_VALUES, spec.ENSEMBLE_MODEL
        self.model_name = model_name or default_model
        self.timeout_s = timeout_s
        self.deadline_s = timeout_s if deadline_s is None else deadline_s
        self.attempts = 0  # requests sent so far, retries included
        self._client = self._connect()
        self._max_batch_size: Optional[int] = None

    def _connect(self):
        timeout = self.timeout_s
        kwargs = {"network_timeout": timeout, "connection_timeout": timeout} if self.protocol == "http" else {}
        return self._triton.InferenceServerClient(self.url, **kwargs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SafetyCheckerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def max_batch_size(self) -> int:
        """Read once from the served config, so the client follows the deployment."""
        if self._max_batch_size is None:
            config = self._call("get_model_config", self.model_name)
            if self.protocol == "grpc":
                config = {"max_batch_size": config.config.max_batch_size}
            self._max_batch_size = int(config["max_batch_size"])
            if self._max_batch_size < 1:
                raise CheckError(f"model {self.model_name} does not batch (max_batch_size {self._max_batch_size})")
        return self._max_batch_size

    def _call(self, method: str, *args, **kwargs):
        """The tritonclient method `method`, sent again while the server fails, until the deadline."""
        from tritonclient.utils import InferenceServerException

        started = time.monotonic()
        wait = RETRY_FIRST_WAIT_S
        tries = 0
        while True:
            tries += 1
            self.attempts += 1
            try:
                return getattr(self._client, method)(*args, **kwargs)
            except Exception as err:  # connection refused, timeouts: tritonclient raises several types
                text = err.message() if isinstance(err, InferenceServerException) else str(err) or type(err).__name__
                where = f"{self.model_name} at {self.url} ({self.protocol})"
                if not retryable(err):
                    raise CheckError(f"{where}: {text}") from err
                pause = wait * random.uniform(0.5, 1.0)
                elapsed = time.monotonic() - started
                if elapsed + pause >= (self.deadline_s or 0.0):
                    detail = f" (not checked: {tries} attempts in {elapsed:.1f} s)" if tries > 1 else ""
                    raise CheckError(f"{where}: {text}{detail}") from err
            time.sleep(pause)
            wait = min(wait * RETRY_GROWTH, RETRY_MAX_WAIT_S)
            try:  # a fresh connection: the old one may lead to a server that is gone
                self._client.close()
            except Exception:
                pass
            self._client = self._connect()

    def preprocess(self, images: Sequence[ImageLike], value_range: Tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        """The batch this client sends for `images`: uint8 images or float32 pixel_values."""
        if self.encoded:
            raise ValueError(
                "encoded=True sends image files as they are: use check_files(paths) or check_encoded(file_bytes)"
            )
        return (preprocess_uint8 if self.uint8 else preprocess)(images, value_range=value_range)

    def infer(self, batch: np.ndarray, strictness: Strictness = None) -> Dict[str, np.ndarray]:
        """Run a batch in the client's input form, in as many requests as max_batch_size needs.

        float32 pixel_values [N, 3, 224, 224] (other float dtypes are cast),
        with `uint8=True` uint8 images [N, 224, 224, 3], or with
        `encoded=True` image files: a sequence of bytes, or an object array
        [N] or [N, 1] of them.
        """
        batch = self._checked(batch)
        parameters = request_parameters(strictness)
        chunks = [
            self._infer_once(batch[i : i + self.max_batch_size], parameters)
            for i in range(0, len(batch), self.max_batch_size)
        ]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

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

    def _infer_once(self, batch: np.ndarray, parameters: Optional[Dict[str, object]] = None) -> Dict[str, np.ndarray]:
        tensor = self._triton.InferInput(self.input.name, list(batch.shape), self.input.datatype)
        if self.protocol == "http":
            tensor.set_data_from_numpy(batch, binary_data=True)  # the bytes as they are, not base64 in JSON
        else:
            tensor.set_data_from_numpy(batch)
        outputs = [self._triton.InferRequestedOutput(t.name) for t in spec.ENSEMBLE_OUTPUTS]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        if parameters:
            kwargs["parameters"] = parameters
        result = self._call("infer", self.model_name, [tensor], outputs=outputs, **kwargs)
        answer = {t.name: result.as_numpy(t.name) for t in spec.ENSEMBLE_OUTPUTS}
        for name, value in answer.items():
            if value is None or len(value) != len(batch):
                raise CheckError(
                    f"{self.model_name} answered {name} for {0 if value is None else len(value)} of {len(batch)} images"
                )
        return answer

    def check_batch(self, batch: np.ndarray, strictness: Strictness = None) -> List[CheckResult]:
        """One result per image of a batch in the client's input form (see `infer`)."""
        answer = self.infer(batch, strictness)
        return [result_from(answer, i) for i in range(len(batch))]

    def check(
        self, images: Sequence[ImageLike], value_range: Tuple[float, float] = (0.0, 1.0), strictness: Strictness = None
    ) -> List[CheckResult]:
        """Check images (PIL, uint8 arrays or float arrays in `value_range`), one result each, in order."""
        return self.check_batch(self.preprocess(images, value_range), strictness)

    def check_encoded(self, files: Sequence[bytes], strictness: Strictness = None) -> List[CheckResult]:
        """Check image files given as their bytes (PNG, JPEG, WebP, ...), one result each, in order.

        Needs `encoded=True`: the bytes are sent untouched and decoded on the server.
        """
        if not self.encoded:
            raise ValueError("check_encoded sends image files: create the client with encoded=True")
        return self.check_batch(_encoded_batch(files), strictness)

    def check_files(self, paths: Sequence[Union[str, os.PathLike]], strictness: Strictness = None) -> List[CheckResult]:
        """Check image files, one result each, in order.

        With `encoded=True` each file's bytes are sent untouched (a JPEG stays
        a JPEG) and the server decodes them; otherwise the files are decoded
        and preprocessed here. A file that cannot be read raises ImageError;
        with `encoded=True` one the server cannot decode fails the call with
        CheckError naming it.
        """
        if not self.encoded:
            return self.check([load_image(path) for path in paths], strictness=strictness)
        files = [read_file(path) for path in paths]
        batch = _encoded_batch(files)
        results = []
        for start in range(0, len(batch), self.max_batch_size):
            try:
                results += self.check_batch(batch[start : start + self.max_batch_size], strictness)
            except CheckError as error:
                index = refused_image(error)
                if index is None or start + index >= len(paths):
                    raise
                raise CheckError(f"{os.fspath(paths[start + index])}: {error}") from error
        return results


# How safety_checker_images names the element it refused: "image 3: ...", its index in the request.
_REFUSED_INDEX = re.compile(r"\bimage (\d+): ")


def refused_image(error: CheckError) -> Optional[int]:
    """The index of the image a refusal names ("image 3: ..."), or None when it names none."""
    named = _REFUSED_INDEX.search(str(error))
    return None if named is None else int(named.group(1))


def read_file(path: Union[str, os.PathLike]) -> bytes:
    """An image file's bytes, untouched; ImageError if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ImageError(f"cannot read image file {os.fspath(path)!r}: {error.strerror or error}") from error


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
    """Image i of an ensemble answer (the output tensors by name) as a CheckResult."""
    return CheckResult(
        flagged=bool(answer[spec.HAS_NSFW_CONCEPTS.name][i].reshape(-1)[0]),
        concept_scores=_thousandths(answer[spec.CONCEPT_SCORES.name][i]),
        special_scores=_thousandths(answer[spec.SPECIAL_SCORES.name][i]),
        image_embeds=answer[spec.IMAGE_EMBEDS.name][i],
        custom_scores=_json_text(answer[spec.CUSTOM_SCORES.name][i]),
        fired_concepts=_json_text(answer[spec.FIRED_CONCEPTS.name][i]),
        concept_set_version=int(answer[spec.CONCEPT_SET_VERSION.name][i].reshape(-1)[0]),
        strictness_adjustment=float(answer[spec.STRICTNESS_ADJUSTMENT.name][i].reshape(-1)[0]),
        custom_cosines=_json_text(answer[spec.CUSTOM_COSINES.name][i]),
        exact_scores=bool(answer[spec.EXACT_SCORES.name][i].reshape(-1)[0]),
    )


def _json_text(value: np.ndarray):
    """A BYTES output element holding JSON text."""
    item = value.reshape(-1)[0]
    return json.loads(item.decode() if isinstance(item, bytes) else item)


def _thousandths(scores: np.ndarray) -> List[float]:
    """Scores are multiples of 0.001 sent as float32; give back the exact decimals diffusers reports."""
    return [round(float(s), 3) for s in scores]
