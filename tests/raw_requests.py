"""Inference requests built by hand, over HTTP and gRPC, as any client (or attacker) can send them.

tritonclient refuses some requests itself (Triton's reserved parameter names,
mismatched data sizes), so these go below it: the KServe v2 HTTP protocol with
binary tensors (or a raw body), and the gRPC stub with `raw_input_contents`.
Each call returns (status, message) for an error and (None, outputs) for an
answer, status being the HTTP code or the gRPC status name.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# What each protocol calls Triton's error codes.
STATUS = {
    "invalid": {"http": 400, "grpc": "INVALID_ARGUMENT"},
    "not_found": {"http": 404, "grpc": "NOT_FOUND"},
    "unavailable": {"http": 503, "grpc": "UNAVAILABLE"},
    "internal": {"http": 500, "grpc": "INTERNAL"},
}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: List[int]
    data: bytes


@dataclass
class Request:
    model: str
    inputs: List[Tensor]
    parameters: Dict[str, Any] = field(default_factory=dict)
    outputs: List[str] = field(default_factory=list)
    version: str = ""


def tensor(name: str, array: np.ndarray, datatype: Optional[str] = None, shape: Optional[List[int]] = None) -> Tensor:
    datatype = datatype or {"float32": "FP32", "float64": "FP64", "uint8": "UINT8", "int32": "INT32"}[array.dtype.name]
    return Tensor(name, datatype, list(array.shape) if shape is None else shape, array.tobytes())


def _path(request: Request) -> str:
    version = f"/versions/{request.version}" if request.version else ""
    return f"/v2/models/{request.model}{version}/infer"


def send_http_body(url: str, path: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> Tuple[Any, Any]:
    """POST a raw body; (None, (header JSON, binary tail)) or (HTTP code, error message).

    The content type is application/octet-stream unless `headers` say otherwise: urllib's default,
    application/x-www-form-urlencoded, makes tritonserver 2.51 crash on a body of about 4 MB or more
    (docs/robustness.md)."""
    headers = {"Content-Type": "application/octet-stream", **(headers or {})}
    http_request = urllib.request.Request(f"http://{url}{path}", data=body, method="POST", headers=headers)
    try:
        with _HTTP.open(http_request, timeout=120) as response:
            raw = response.read()
            length = response.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            text = json.loads(text)["error"]
        except (ValueError, KeyError):
            pass
        return error.code, text
    if length is None:
        return None, (json.loads(raw), b"")
    return None, (json.loads(raw[: int(length)]), raw[int(length) :])


def send_http(url: str, request: Request) -> Tuple[Any, Any]:
    header: Dict[str, Any] = {
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": t.shape, "parameters": {"binary_data_size": len(t.data)}}
            for t in request.inputs
        ]
    }
    if request.parameters:
        header["parameters"] = request.parameters
    if request.outputs:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": False}} for name in request.outputs]
    text = json.dumps(header).encode()
    body = text + b"".join(t.data for t in request.inputs)
    return send_http_body(url, _path(request), body, {"Inference-Header-Content-Length": str(len(text))})


def _parameter(value: Any) -> service_pb2.InferParameter:
    parameter = service_pb2.InferParameter()
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = value
    return parameter


def send_grpc(url: str, request: Request) -> Tuple[Any, Any]:
    message = service_pb2.ModelInferRequest(model_name=request.model, model_version=request.version)
    for key, value in request.parameters.items():
        message.parameters[key].CopyFrom(_parameter(value))
    for t in request.inputs:
        entry = message.inputs.add()
        entry.name, entry.datatype = t.name, t.datatype
        entry.shape.extend(t.shape)
        message.raw_input_contents.append(t.data)
    for name in request.outputs:
        message.outputs.add().name = name
    with grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
        try:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=120)
        except grpc.RpcError as error:
            return error.code().name, error.details()
    return None, response


def send(server, protocol: str, request: Request) -> Tuple[Any, Any]:
    if protocol == "http":
        return send_http(server.http_url, request)
    return send_grpc(server.grpc_url, request)


def bytes_elements(raw: bytes) -> List[bytes]:
    """A BYTES tensor in Triton's binary form: 4-byte little-endian lengths, each followed by its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items
