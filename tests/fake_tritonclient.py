"""Stand-ins for a tritonclient protocol module and the clock, so the real `SafetyCheckerClient` runs without a
server: requests are answered in-process by a function, and retries wait on a clock that only moves when
slept on. The client, scan and the drop-in tests count requests and waits instead of timing them."""

from __future__ import annotations

import json
from typing import Callable, Dict, List, Sequence

import numpy as np
from tritonclient.utils import InferenceServerException

from safety_checker_client import spec

# An answering function: (the batch sent, the output names requested, the infer call's keywords) -> outputs.
Answer = Callable[[np.ndarray, List[str], dict], Dict[str, np.ndarray]]


class FakeClock:
    """monotonic() and sleep(): sleeping moves the clock at once and records the wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class UpperBound:
    """An rng whose draws are always the top of the range: the retry waits are exactly the schedule's."""

    def uniform(self, low: float, high: float) -> float:
        return high


class _Input:
    def __init__(self, name: str, shape: Sequence[int], datatype: str) -> None:
        self.name, self.shape, self.datatype = name, list(shape), datatype
        self.array = None

    def set_data_from_numpy(self, array: np.ndarray, binary_data: bool = True) -> None:
        assert list(array.shape) == self.shape
        self.array = array


class _Output:
    def __init__(self, name: str) -> None:
        self.name = name


class _Result:
    def __init__(self, arrays: Dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str):
        return self.arrays.get(name)


class FakeTriton:
    """What the client takes as `triton=`: InferInput, InferRequestedOutput and InferenceServerClient."""

    InferInput = _Input
    InferRequestedOutput = _Output

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: List[tuple] = []  # (batch, output names, keywords) per infer call
        self.connections = 0

    def InferenceServerClient(self, url: str, **kwargs) -> _Connection:
        self.connections += 1
        return _Connection(self)


class _Connection:
    """Has only `infer` and `close`: any other RPC (a model config, say) fails the test."""

    def __init__(self, triton: FakeTriton) -> None:
        self.triton = triton

    def infer(self, model_name: str, inputs, outputs=None, **kwargs) -> _Result:
        (tensor,) = inputs
        names = [output.name for output in outputs]
        self.triton.requests.append((tensor.array, names, kwargs))
        return _Result(self.triton.answer(tensor.array, names, kwargs))

    def close(self) -> None:
        pass


def answers(flags: Sequence[bool], names: Sequence[str]) -> Dict[str, np.ndarray]:
    """An ensemble answer with the outputs `names`: an image is flagged with concept_00 or not."""
    n = len(flags)
    text = lambda values: np.array([[json.dumps(v).encode()] for v in values], dtype=object)
    every = {
        spec.HAS_NSFW_CONCEPTS.name: np.array(flags, dtype=bool).reshape(n, 1),
        spec.CONCEPT_SCORES.name: np.array([[0.01 if f else -0.01] * 17 for f in flags], dtype=np.float32),
        spec.SPECIAL_SCORES.name: np.full((n, 3), -0.1, dtype=np.float32),
        spec.IMAGE_EMBEDS.name: np.zeros((n, 4), dtype=np.float32),
        spec.FIRED_CONCEPTS.name: text([["concept_00"] if f else [] for f in flags]),
        spec.CUSTOM_SCORES.name: text([{}] * n),
        spec.CUSTOM_COSINES.name: text([{}] * n),
        spec.CONCEPT_SET_VERSION.name: np.zeros((n, 1), dtype=np.int64),
        spec.STRICTNESS_ADJUSTMENT.name: np.zeros((n, 1), dtype=np.float64),
        spec.EXACT_SCORES.name: np.ones((n, 1), dtype=bool),
        spec.VIEW.name: text([{"frame": 0, "frames": 1, "transparency": None, "views": 1}] * n),
    }
    return {name: every[name] for name in names}


def refusal(index: int, reason: str = "is invalid", status: str = "StatusCode.INVALID_ARGUMENT"):
    """What Triton raises for a request it refuses because of one image."""
    return InferenceServerException(f"image {index}: {reason}", status=status)


def internal(reason: str = "the stub raised", status: str = "StatusCode.INTERNAL"):
    """What Triton raises for a request a model failed on (finding 6: no image named, nothing says which)."""
    return InferenceServerException(f"in ensemble 'safety_checker_images', {reason}", status=status)


def numbers(batch: np.ndarray) -> List[int]:
    """The number each image of a batch stands for: its first pixel (uint8, float) or its bytes' text (files)."""
    if batch.dtype == object:
        return [int(bytes(element)) for element in batch.reshape(-1)]
    return [int(image.reshape(-1)[0]) for image in batch]
