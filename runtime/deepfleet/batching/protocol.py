"""KServe v2 / Open Inference Protocol JSON bodies: request schema and tensor (de)coding.

Unknown fields are rejected (except inside the open `parameters` maps, which the protocol keeps open);
every error names the offending field, e.g. `inputs[0].data`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from deepfleet.batching.datatypes import KSERVE, NUMPY
from deepfleet.batching.errors import InvalidInput
from deepfleet.batching.repository import ModelConfig

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr
_STRICT = ConfigDict(extra="forbid")


class InputTensor(BaseModel):
    model_config = _STRICT
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: dict[str, Parameter] | None = None
    data: list[Any]


class RequestedOutput(BaseModel):
    model_config = _STRICT
    name: StrictStr
    parameters: dict[str, Parameter] | None = None


class InferRequest(BaseModel):
    model_config = _STRICT
    id: StrictStr | None = None
    parameters: dict[str, Parameter] | None = None
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def parse_request(body: Any) -> InferRequest:
    try:
        return InferRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(_location(first["loc"]), first["msg"]) from None


# numpy kinds accepted for each datatype family: JSON numbers decode to int64/float64 arrays
_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def decode_tensor(tensor: InputTensor, field: str, config: ModelConfig) -> np.ndarray:
    spec = next((s for s in config.inputs if s.name == tensor.name), None)
    if spec is None:
        names = [s.name for s in config.inputs]
        raise InvalidInput(
            f"{field}.name", f"unknown input '{tensor.name}' for model '{config.name}' (inputs: {names})"
        )
    if tensor.datatype != spec.datatype:
        raise InvalidInput(f"{field}.datatype", f"input '{spec.name}' is {spec.datatype}, got '{tensor.datatype}'")
    if any(d < 0 for d in tensor.shape):
        raise InvalidInput(f"{field}.shape", "dims must be non-negative")
    dtype = NUMPY[spec.datatype]
    try:
        array = np.array(tensor.data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{field}.data", "must be a flat or regularly nested list of numbers") from None
    if array.size and array.dtype.kind not in _KINDS[dtype.kind]:
        raise InvalidInput(f"{field}.data", f"elements must be {spec.datatype} values")
    count = math.prod(tensor.shape)
    if array.size != count:
        raise InvalidInput(f"{field}.data", f"has {array.size} elements but shape {tensor.shape} needs {count}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"{field}.data", f"values out of {spec.datatype} range [{info.min}, {info.max}]")
    return array.astype(dtype, copy=False).reshape(tensor.shape)


def decode_inputs(request: InferRequest, config: ModelConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays by input name and, for error messages, each input's place in the request."""
    arrays, fields = {}, {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}]"
        if tensor.name in arrays:
            raise InvalidInput(f"{field}.name", f"input '{tensor.name}' given twice")
        arrays[tensor.name] = decode_tensor(tensor, field, config)
        fields[tensor.name] = field
    return arrays, fields


def timeout_seconds(request: InferRequest, config: ModelConfig) -> float | None:
    """The `timeout` request parameter (microseconds, as in Triton's schedule-policy extension; 0 = none),
    else the model's default_timeout_ms."""
    value = (request.parameters or {}).get("timeout")
    if value is None or value == 0:
        return None if config.default_timeout_ms is None else config.default_timeout_ms / 1000
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput("parameters.timeout", "must be a non-negative integer number of microseconds")
    return value / 1e6


def requested_outputs(request: InferRequest, config: ModelConfig) -> list[str]:
    if request.outputs is None:
        return [s.name for s in config.outputs]
    known = {s.name for s in config.outputs}
    for i, out in enumerate(request.outputs):
        if out.name not in known:
            raise InvalidInput(f"outputs[{i}].name", f"unknown output '{out.name}' (outputs: {sorted(known)})")
    return [o.name for o in request.outputs]


def encode_response(
    config: ModelConfig, request: InferRequest, arrays: dict[str, np.ndarray], names: list[str]
) -> dict:
    body: dict[str, Any] = {"model_name": config.name, "model_version": config.version, "outputs": [
        {"name": n, "datatype": KSERVE[arrays[n].dtype], "shape": list(arrays[n].shape),
         "data": arrays[n].ravel().tolist()}
        for n in names
    ]}
    if request.id is not None:
        body["id"] = request.id
    return body


def tensor_metadata(config: ModelConfig, kind: str) -> list[dict]:
    """Shapes as Triton reports them: -1 for the batch dim and for every dynamic dim."""
    return [
        {"name": s.name, "datatype": s.datatype, "shape": [-1] + [d if isinstance(d, int) else -1 for d in s.dims]}
        for s in getattr(config, kind)
    ]
