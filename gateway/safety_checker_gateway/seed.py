"""The KServe runtime's protocol: its request as its callers send it, its answer as it gave it.

The runtime this project replaces (a kserve 0.12.1 `Model`, answering through
`get_predict_response`) took `{"inputs":[{"name":"image","shape":[1,1],
"datatype":"String","data":["<base64 PNG>"]}]}` and answered
`{"model_name":..,"model_version":null,"id":..,"parameters":null,"outputs":
[{"name":"output-0","shape":[1],"datatype":"BOOL","parameters":null,
"data":[false]}]}`; its callers read `outputs[0].data[0]`. Here the same body
(datatype "String" or "BYTES", shape [1,1], [1] or [N,1], base64 text in JSON
or raw files through the binary tensor extension) gets that answer, one
decision per image, or, for outputs named in `outputs`, the checker's own.
"""

from __future__ import annotations

import json
import struct
import uuid
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from safety_checker_client import spec
from safety_checker_client.strictness import StrictnessError, adjustment
from safety_checker_gateway.failures import bad_request

SEED_OUTPUT = "output-0"  # what kserve's get_predict_response named the decision
DATATYPES = ("String", "BYTES")  # the runtime's callers send "String"; v2's name for it is BYTES
REQUEST_FIELDS = ("id", "parameters", "inputs", "outputs")
INPUT_FIELDS = ("name", "shape", "datatype", "data", "parameters")
# binary_data_output / binary_data: tritonclient asks for binary outputs; the answer is JSON, which it reads.
REQUEST_PARAMETERS = (spec.STRICTNESS_PARAMETER, spec.STRICTNESS_ADJUSTMENT_PARAMETER, "binary_data_output")
OUTPUT_NAMES = (SEED_OUTPUT, *(t.name for t in spec.IMAGES_OUTPUTS))
_TENSORS = {t.name: t for t in spec.IMAGES_OUTPUTS}
BINARY_HEADER = "inference-header-content-length"  # the binary tensor extension: JSON, then the tensors' bytes


@dataclass(frozen=True)
class SeedRequest:
    images: List[bytes]  # each a file's raw bytes or its base64 text: Triton tells them apart
    outputs: Tuple[str, ...]  # () for the runtime's answer
    parameters: Dict[str, object]  # what Triton is sent (the strictness)
    id: Optional[str]


def _unknown(kind: str, given: Mapping[str, object], known: Tuple[str, ...]) -> None:
    extra = [name for name in given if name not in known]
    if extra:
        names = ", ".join(repr(name) for name in extra)
        raise bad_request(f"unknown {kind} {names}; known: {', '.join(known)}")


def _object(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise bad_request(f"{what} must be a JSON object")
    return value


def parse(body: bytes, headers: Mapping[str, str]) -> SeedRequest:
    """The request's images, named outputs and strictness; a 400 naming what is wrong otherwise."""
    binary = b""
    if BINARY_HEADER in headers:
        try:
            length = int(headers[BINARY_HEADER])
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise bad_request(f"{BINARY_HEADER} must be the length of the JSON at the start of the body")
        body, binary = body[:length], body[length:]
    try:
        request = _object(json.loads(body), "the request")
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    _unknown("request field(s)", request, REQUEST_FIELDS)
    if request.get("id") is not None and not isinstance(request["id"], str):
        raise bad_request("'id' must be a string")
    parameters = _parameters(request.get("parameters"))
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise bad_request(f"'inputs' must hold one input, {spec.IMAGE.name!r}")
    images = _images(_object(inputs[0], "an input"), binary)
    return SeedRequest(images, _outputs(request.get("outputs")), parameters, request.get("id"))


def _parameters(given: object) -> Dict[str, object]:
    given = {} if given is None else _object(given, "'parameters'")
    _unknown("parameter(s)", given, REQUEST_PARAMETERS)
    if not isinstance(given.get("binary_data_output", False), bool):
        raise bad_request("parameter 'binary_data_output' must be true or false")
    chosen = {k: v for k, v in given.items() if k != "binary_data_output"}
    try:
        adjustment(chosen.get(spec.STRICTNESS_PARAMETER), chosen.get(spec.STRICTNESS_ADJUSTMENT_PARAMETER))
    except StrictnessError as error:
        raise bad_request(str(error)) from None
    return chosen


def _images(tensor: dict, binary: bytes) -> List[bytes]:
    _unknown("input field(s)", tensor, INPUT_FIELDS)
    if tensor.get("name") != spec.IMAGE.name:
        raise bad_request(f"the input must be named {spec.IMAGE.name!r}, not {tensor.get('name')!r}")
    if tensor.get("datatype") not in DATATYPES:
        raise bad_request(f"input datatype must be one of {', '.join(DATATYPES)}, not {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    valid = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    if not valid or not (shape == [1] or (len(shape) == 2 and shape[1] == 1 and shape[0] >= 1)):
        raise bad_request(f"input shape must be [1], [1, 1] or [N, 1], not {shape!r}")
    if shape[0] > spec.MAX_BATCH_SIZE:
        raise bad_request(f"a request holds at most {spec.MAX_BATCH_SIZE} images, not {shape[0]}")
    parameters = _object(tensor.get("parameters") or {}, "input 'parameters'")
    _unknown("input parameter(s)", parameters, ("binary_data_size",))
    if "binary_data_size" in parameters:
        if "data" in tensor:
            raise bad_request("an input has 'data' or 'binary_data_size', not both")
        if parameters["binary_data_size"] != len(binary):
            raise bad_request("input parameter 'binary_data_size' must be the length of the bytes after the JSON")
        images = _binary_elements(binary)
    else:
        if binary:
            raise bad_request("bytes follow the JSON but no input has 'binary_data_size'")
        images = _json_elements(tensor.get("data"))
    if len(images) != shape[0]:
        raise bad_request(f"input shape {shape} holds {shape[0]} images but the data holds {len(images)}")
    return images


def _json_elements(data: object) -> List[bytes]:
    """Strings, flat or one per row: base64 text (or any text, which Triton refuses naming the image)."""
    if not isinstance(data, list):
        raise bad_request("input 'data' must be a list of base64 strings")
    rows = [row[0] if isinstance(row, list) and len(row) == 1 else row for row in data]
    for index, element in enumerate(rows):
        if not isinstance(element, str) or not element:
            raise bad_request(f"image {index}: each element must be a non-empty base64 string")
    return [element.encode() for element in rows]


def _binary_elements(binary: bytes) -> List[bytes]:
    """BYTES elements of the binary tensor extension: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise bad_request("the binary input data ends inside an element's length")
        (size,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + size > len(binary):
            raise bad_request(f"image {len(elements)}: the binary input data ends inside the element")
        elements.append(binary[offset : offset + size])
        offset += size
    return elements


def _outputs(given: object) -> Tuple[str, ...]:
    if given is None:
        return ()
    if not isinstance(given, list):
        raise bad_request("'outputs' must be a list")
    names = []
    for output in given:
        output = _object(output, "an output")
        _unknown("output field(s)", output, ("name", "parameters"))
        _unknown(
            "output parameter(s)", _object(output.get("parameters") or {}, "output 'parameters'"), ("binary_data",)
        )
        if output.get("name") not in OUTPUT_NAMES:
            raise bad_request(f"unknown output {output.get('name')!r}; known: {', '.join(OUTPUT_NAMES)}")
        if output["name"] in names:
            raise bad_request(f"output {output['name']!r} is named twice")
        names.append(output["name"])
    return tuple(names)


def triton_outputs(request: SeedRequest) -> Tuple[str, ...]:
    """The Triton outputs an answer needs: the decision, and the outputs the request names."""
    return tuple(name for name in request.outputs if name != SEED_OUTPUT)


def answer(model_name: str, request: SeedRequest, outputs: Mapping[str, np.ndarray]) -> dict:
    """The runtime's answer, in its fields' order; named outputs each as the checker gives it."""
    decisions = [bool(d) for d in outputs[spec.HAS_NSFW_CONCEPTS.name].reshape(len(request.images), -1)[:, 0]]
    seed = {"name": SEED_OUTPUT, "shape": [len(decisions)], "datatype": "BOOL", "parameters": None, "data": decisions}
    tensors = [
        seed if name == SEED_OUTPUT else _tensor(name, outputs[name]) for name in request.outputs or (SEED_OUTPUT,)
    ]
    return {
        "model_name": model_name,
        "model_version": None,
        "id": request.id if request.id else str(uuid.uuid4()),
        "parameters": None,
        "outputs": tensors,
    }


def _tensor(name: str, value: np.ndarray) -> dict:
    data = value.reshape(-1).tolist()
    if _TENSORS[name].datatype == "BYTES":
        data = [item.decode() if isinstance(item, bytes) else item for item in data]
    return {
        "name": name,
        "shape": list(value.shape),
        "datatype": _TENSORS[name].datatype,
        "parameters": None,
        "data": data,
    }
