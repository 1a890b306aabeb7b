"""A stand-in for `triton_python_backend_utils`: the served Python models run in-process, without a tritonserver.

The models (model_repository/*/1/model.py, safety_checker_served.onnx_runner)
import `triton_python_backend_utils`, which only the Python backend's stub
provides. `install()` puts this module in its place. `Server.load` imports a
model.py by path and calls `initialize` with what the stub passes: the
config as Triton's JSON (`triton_config`), the model folder, the version.
`LoadedModel.execute` hands a model a dynamic batch of requests, and a BLS
`InferenceRequest.exec()` hands one request to the model of that name loaded
in the same `Server`, so the cascade runs against the real runner and
postprocessor; its errors come back as the served Triton (2.51) returns them,
as INTERNAL.

Around every call it checks what Triton checks, so that a test cannot pass on
something the server would refuse: inputs against the config (names, data
types, shapes, at most max_batch_size images in a batch), one response per
request, outputs against the config, BLS parameters of bool, int or str only.
Tensors are copied where Triton copies them (into and out of a model), BYTES
elements come out as `bytes`, as the stub's deserialiser gives them.

What is mimicked is read from triton-inference-server/python_backend
(src/pb_stub.cc, src/pb_tensor.cc, resources/triton_python_backend_utils.py)
and core (src/model_config_utils.cc: ModelConfigToJson).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

MODEL_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"

# config data_type -> the numpy dtype of its tensors (TYPE_STRING: BYTES, numpy objects).
CONFIG_TYPES = {
    "TYPE_BOOL": np.dtype(bool),
    "TYPE_UINT8": np.dtype(np.uint8),
    "TYPE_INT32": np.dtype(np.int32),
    "TYPE_INT64": np.dtype(np.int64),
    "TYPE_FP32": np.dtype(np.float32),
    "TYPE_FP64": np.dtype(np.float64),
    "TYPE_STRING": np.dtype(object),
}


# -- what the stub's module offers ------------------------------------------------------------------------
class TritonError:
    """pb_utils.TritonError: a message and a TRITONSERVER_Error_Code (INTERNAL unless given)."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {CODE_NAMES[self._code]})"


CODE_NAMES = dict(
    enumerate(
        ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS", "CANCELLED")
    )
)


class TritonModelException(Exception):
    """What a model raises in initialize (the load fails) or execute (its whole batch fails)."""


class Tensor:
    """pb_utils.Tensor: a name and a C-contiguous numpy array."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        if not name:
            raise TritonModelException("Tensor name cannot be an empty string.")
        array = np.asarray(array)
        if array.dtype.kind in "US":
            array = array.astype(object)
        if array.dtype not in CONFIG_TYPES.values():
            raise TritonModelException(f"tensor {name!r}: numpy dtype {array.dtype} has no Triton type here")
        self._name = name
        self._array = array if array.flags.c_contiguous else np.ascontiguousarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> List[int]:
        return list(self._array.shape)


def _carried(tensor: Tensor) -> Tensor:
    """The tensor as the other side of Triton sees it: a copy; BYTES elements as `bytes`
    (serialize_byte_tensor encodes anything else with str(...).encode())."""
    array = tensor.as_numpy()
    if array.dtype == object:
        elements = [e if type(e) is bytes else str(e).encode("utf-8") for e in array.reshape(-1)]
        copy = np.empty(len(elements), dtype=object)
        copy[:] = elements
        return Tensor(tensor.name(), copy.reshape(array.shape))
    return Tensor(tensor.name(), array.copy())


def _parameters_json(parameters: Optional[Dict[str, Any]]) -> str:
    """PyParametersToJSON: a BLS request or a response takes str keys with bool, int or str values only."""
    parameters = parameters or {}
    for key, value in parameters.items():
        if not isinstance(key, str):
            raise TritonModelException(f"Expect parameters keys to have type str, found type {type(key)}")
        if not isinstance(value, (bool, int, str)):
            raise TritonModelException(f"Expect parameters values to have type bool/int/str, found type {type(value)}")
    return json.dumps(parameters)


class InferenceResponse:
    def __init__(
        self,
        output_tensors: Sequence[Tensor] = (),
        error: Optional[TritonError] = None,
        parameters: Optional[Dict[str, Any]] = None,
    ) -> None:
        self._outputs = list(output_tensors)
        self._error = error
        self._parameters = _parameters_json(parameters)

    def output_tensors(self) -> List[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> Optional[TritonError]:
        return self._error

    def parameters(self) -> str:
        return self._parameters

    def outputs(self) -> Dict[str, np.ndarray]:
        """Test helper: output name -> array."""
        return {t.name(): t.as_numpy() for t in self._outputs}


class InferenceRequest:
    """pb_utils.InferenceRequest: what a model receives, and what a BLS call builds and `exec()`s."""

    def __init__(
        self,
        model_name: str = "",
        inputs: Sequence[Tensor] = (),
        requested_output_names: Sequence[str] = (),
        parameters: Optional[Dict[str, Any]] = None,
        request_id: str = "",
        **_ignored: Any,
    ) -> None:
        self._model_name = model_name
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self._parameters = _parameters_json(parameters)
        self._request_id = request_id

    def inputs(self) -> List[Tensor]:
        return self._inputs

    def parameters(self) -> str:
        return self._parameters

    def requested_output_names(self) -> List[str]:
        return self._requested

    def request_id(self) -> str:
        return self._request_id

    def model_name(self) -> str:
        return self._model_name

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        if _active is None:
            raise TritonModelException("a BLS request outside execute(): no server to send it to")
        return _active.infer(self)


def request(
    tensors: Dict[str, np.ndarray],
    parameters: Union[Dict[str, Any], str, None] = None,
    requested_output_names: Sequence[str] = (),
) -> InferenceRequest:
    """A client's request as Triton hands it to a model: its parameters are compact JSON text that may hold
    numbers of any kind (the front ends pass doubles on); a str is passed as it is (a key twice, bad text)."""
    built = InferenceRequest(
        inputs=[Tensor(n, a) for n, a in tensors.items()], requested_output_names=requested_output_names
    )
    if isinstance(parameters, str):
        built._parameters = parameters
    else:
        built._parameters = json.dumps(parameters or {}, separators=(",", ":"))
    return built


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Optional[Tensor]:
    return next((t for t in inference_request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Optional[Tensor]:
    return next((t for t in inference_response.output_tensors() if t.name() == name), None)


# Every line the models logged, as (level, message).
LOG: List[Tuple[str, str]] = []


class Logger:
    @staticmethod
    def log_info(message: str) -> None:
        LOG.append(("INFO", message))

    @staticmethod
    def log_warn(message: str) -> None:
        LOG.append(("WARNING", message))

    @staticmethod
    def log_error(message: str) -> None:
        LOG.append(("ERROR", message))

    @staticmethod
    def log_verbose(message: str) -> None:
        LOG.append(("VERBOSE", message))


# Metric values as Prometheus keeps them: one per family name and label set, whichever instance counts.
_METRICS: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}


def metric_value(family: str, **labels: str) -> float:
    return _METRICS.get((family, tuple(sorted(labels.items()))), 0.0)


class Metric:
    def __init__(self, family: MetricFamily, labels: Optional[Dict[str, str]]) -> None:
        self.kind = family.kind
        self.key = (family.name, tuple(sorted((labels or {}).items())))
        _METRICS.setdefault(self.key, 0.0)

    def increment(self, value: float) -> None:
        if self.kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException("a counter only goes up")
        _METRICS[self.key] += value

    def set(self, value: float) -> None:
        if self.kind != MetricFamily.GAUGE:
            raise TritonModelException("only a gauge is set")
        _METRICS[self.key] = value

    def value(self) -> float:
        return _METRICS[self.key]


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "COUNTER", "GAUGE", "HISTOGRAM"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.description, self.kind = name, description, kind

    def Metric(self, labels: Optional[Dict[str, str]] = None, buckets: Any = None) -> Metric:
        return Metric(self, labels)


def install() -> None:
    """Make `import triton_python_backend_utils` give this module (and the served runner use it)."""
    this = sys.modules[__name__]
    sys.modules["triton_python_backend_utils"] = this
    runner = sys.modules.get("safety_checker_served.onnx_runner")
    if runner is not None and runner.pb_utils is not this:
        importlib.reload(runner)


def uninstall() -> None:
    """Outside these tests `triton_python_backend_utils` is not importable again."""
    sys.modules.pop("triton_python_backend_utils", None)
    sys.modules.pop("safety_checker_served.onnx_runner", None)
    _MODULES.clear()


# -- the server around the models -------------------------------------------------------------------------
def triton_config(pbtxt: str) -> Dict[str, Any]:
    """A config.pbtxt as Triton hands it to a Python model: protobuf JSON with proto field names and every
    scalar printed, then int64/uint64 fields turned from protobuf's strings into numbers (ModelConfigToJson)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(pbtxt, model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for tensor in config.get("input", []) + config.get("output", []):
        tensor["dims"] = [int(d) for d in tensor["dims"]]
        if "reshape" in tensor:
            tensor["reshape"]["shape"] = [int(d) for d in tensor["reshape"].get("shape", [])]
    batching = config.get("dynamic_batching", {})
    for key in ("max_queue_delay_microseconds", "priority_levels", "default_priority_level"):
        if key in batching:
            batching[key] = int(batching[key])
    if "default_queue_policy" in batching:
        policy = batching["default_queue_policy"]
        policy["default_timeout_microseconds"] = int(policy["default_timeout_microseconds"])
    for warmup in config.get("model_warmup", []):
        for value in warmup.get("inputs", {}).values():
            value["dims"] = [int(d) for d in value["dims"]]
    for step in config.get("ensemble_scheduling", {}).get("step", []):
        step["model_version"] = int(step["model_version"])
    return config


_MODULES: Dict[str, Any] = {}


def model_module(name: str) -> Any:
    """model_repository/NAME/1/model.py, imported by path with this module as triton_python_backend_utils."""
    if name not in _MODULES:
        install()
        path = MODEL_REPOSITORY / name / "1" / "model.py"
        spec = importlib.util.spec_from_file_location(f"served_model_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


@dataclass
class LoadedModel:
    name: str
    config: Dict[str, Any]
    instance: Any
    server: Server

    @property
    def parameters(self) -> Dict[str, str]:
        return {key: value["string_value"] for key, value in self.config.get("parameters", {}).items()}

    def execute(self, requests: Sequence[InferenceRequest]) -> List[InferenceResponse]:
        """One dynamic batch through execute(), checked as Triton checks it."""
        return self.server.execute(self, requests)


_active: Optional[Server] = None


class Server:
    """The models of one repository, by name; a BLS request goes to the one of its model_name."""

    def __init__(self) -> None:
        self.models: Dict[str, LoadedModel] = {}

    def load(
        self, name: str, model_dir: Path, pbtxt: str, parameters: Optional[Dict[str, str]] = None, register: bool = True
    ) -> LoadedModel:
        """Initialize model_repository/NAME's model with the config `pbtxt` (its `parameters` replaced by
        these, as a deployment may write them) and the folder `model_dir` (holding version 1)."""
        config = triton_config(pbtxt)
        for key, value in (parameters or {}).items():
            config.setdefault("parameters", {})[key] = {"string_value": value}
        instance = model_module(name).TritonPythonModel()
        instance.initialize(
            {
                "model_config": json.dumps(config),
                "model_instance_kind": "CPU",
                "model_instance_name": f"{name}_0_0",
                "model_instance_device_id": "0",
                "model_repository": str(model_dir),
                "model_version": "1",
                "model_name": name,
            }
        )
        loaded = LoadedModel(name, config, instance, self)
        if register:
            self.models[name] = loaded
        return loaded

    def execute(self, model: LoadedModel, requests: Sequence[InferenceRequest]) -> List[InferenceResponse]:
        global _active
        images = sum(_checked_inputs(model, r) for r in requests)
        limit = model.config["max_batch_size"]
        assert images <= limit, f"Triton never batches {images} images for {model.name} (max_batch_size {limit})"
        received = [_received(r) for r in requests]
        previous, _active = _active, self
        try:
            responses = model.instance.execute(received)
        except Exception as error:  # Triton answers every request of the batch with the error
            message = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            responses = [InferenceResponse(error=TritonError(message)) for _ in requests]
        finally:
            _active = previous
        assert isinstance(responses, list) and len(responses) == len(requests), f"{model.name}: {responses!r}"
        return [_checked_response(model, r, q) for r, q in zip(responses, requests)]

    def infer(self, bls: InferenceRequest) -> InferenceResponse:
        """A BLS request: Triton's checks, then the model's execute with this one request. An error comes back
        with its message and the code INTERNAL, whatever its own code was: so the Python backend of Triton 2.51
        (the bundled server, NGC 24.10) builds it (src/request_executor.cc; later releases keep the code)."""
        model = self.models.get(bls.model_name())
        if model is None:
            return InferenceResponse(error=TritonError(f"Request for unknown model: '{bls.model_name()}'"))
        outputs = [t["name"] for t in model.config["output"]]
        unknown = [name for name in bls.requested_output_names() if name not in outputs]
        if unknown:
            return InferenceResponse(error=TritonError(f"unknown outputs {unknown} requested"))
        try:
            _checked_inputs(model, bls)
        except AssertionError as error:
            return InferenceResponse(error=TritonError(str(error)))
        (response,) = self.execute(model, [bls])
        if response.has_error():
            return InferenceResponse(error=TritonError(response.error().message()))
        return response


def _received(sent: InferenceRequest) -> InferenceRequest:
    """The request as the model sees it: its own copy of every tensor."""
    copy = InferenceRequest(
        sent.model_name(), [_carried(t) for t in sent.inputs()], sent.requested_output_names(), None, sent.request_id()
    )
    copy._parameters = sent.parameters()
    return copy


def _tensor_configs(model: LoadedModel, kind: str) -> Dict[str, Dict[str, Any]]:
    return {t["name"]: t for t in model.config[kind]}


def _check_tensor(model: LoadedModel, tensor: Tensor, config: Dict[str, Any], images: int) -> None:
    array = tensor.as_numpy()
    want = CONFIG_TYPES[config["data_type"]]
    assert array.dtype == want, f"{model.name} {tensor.name()}: {array.dtype}, the config says {want}"
    shape = [images, *config["dims"]]
    assert len(array.shape) == len(shape) and all(d in (s, -1) for d, s in zip(shape, array.shape)), (
        f"{model.name} {tensor.name()}: shape {list(array.shape)}, the config says {shape}"
    )


def _checked_inputs(model: LoadedModel, request: InferenceRequest) -> int:
    """The number of images in the request, after Triton's checks of its inputs."""
    configs = _tensor_configs(model, "input")
    given = {t.name(): t for t in request.inputs()}
    assert len(given) == len(request.inputs()), f"{model.name}: an input given twice"
    assert set(given) <= set(configs), f"{model.name}: unexpected inputs {sorted(set(given) - set(configs))}"
    missing = [n for n, c in configs.items() if n not in given and not c.get("optional")]
    assert not missing, f"{model.name}: missing inputs {missing}"
    sizes = {len(t.as_numpy()) for t in given.values()}
    assert len(sizes) == 1, f"{model.name}: inputs of different batch sizes {sizes}"
    (images,) = sizes
    assert 1 <= images <= model.config["max_batch_size"], f"{model.name}: a request of {images} images"
    for name, tensor in given.items():
        _check_tensor(model, tensor, configs[name], images)
    return images


def _checked_response(model: LoadedModel, response: InferenceResponse, request: InferenceRequest) -> InferenceResponse:
    """The response as the caller receives it: an error alone, or the requested outputs (all, if none were
    named), each as the config declares it, copied."""
    assert isinstance(response, InferenceResponse), f"{model.name} answered {response!r}"
    if response.has_error():
        assert not response.output_tensors(), f"{model.name}: an error response with outputs"
        return InferenceResponse(error=TritonError(response.error().message(), response.error().code()))
    configs = _tensor_configs(model, "output")
    produced = {t.name(): t for t in response.output_tensors()}
    assert set(produced) <= set(configs), f"{model.name}: undeclared outputs {sorted(set(produced) - set(configs))}"
    wanted = request.requested_output_names() or list(configs)
    missing = [name for name in wanted if name not in produced]
    assert not missing, f"{model.name}: outputs missing from its response: {missing}"
    # Triton checks an output's type and dims, not its batch size: a step of the images ensemble answers as many
    # rows as its request's files make views (the decoder), or as it has files (the views model). One response's
    # outputs still share their batch size.
    images = len(produced[wanted[0]].as_numpy())
    for name in wanted:
        _check_tensor(model, produced[name], configs[name], images)
    return InferenceResponse([_carried(produced[name]) for name in wanted])
