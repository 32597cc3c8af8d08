"""ONNX Runtime backend. The session's intra-op thread count is configurable because several models
(and the HTTP server) share a host's cores; inter-op parallelism stays at 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepfleet.batching.errors import BackendUnavailable, ConfigError
from deepfleet.batching.repository import ModelConfig

# onnxruntime's element types, as reported by NodeArg.type, for each KServe datatype
_ORT_TYPES = {
    "BOOL": "tensor(bool)", "UINT8": "tensor(uint8)", "UINT16": "tensor(uint16)", "UINT32": "tensor(uint32)",
    "UINT64": "tensor(uint64)", "INT8": "tensor(int8)", "INT16": "tensor(int16)", "INT32": "tensor(int32)",
    "INT64": "tensor(int64)", "FP16": "tensor(float16)", "FP32": "tensor(float)", "FP64": "tensor(double)",
}


class OnnxRuntimeBackend:
    def __init__(self, path: Path, config: ModelConfig, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("backend 'onnxruntime' needs: pip install 'deepfleet-runtime[onnx]'") from exc
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if config.intra_op_threads:
            options.intra_op_num_threads = config.intra_op_threads
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        _check(config, "inputs", {a.name: a for a in self._session.get_inputs()}, path)
        _check(config, "outputs", {a.name: a for a in self._session.get_outputs()}, path)
        self._outputs = [s.name for s in config.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, inputs), strict=True))

    def close(self) -> None:
        self._session = None


def _check(config: ModelConfig, kind: str, declared: dict, path: Path) -> None:
    for i, spec in enumerate(getattr(config, kind)):
        arg = declared.get(spec.name)
        if arg is None:
            raise ConfigError(
                f"{config.name}: {kind}[{i}].name '{spec.name}' is not in {path} (has {sorted(declared)})"
            )
        if arg.type != _ORT_TYPES[spec.datatype]:
            raise ConfigError(f"{config.name}: {kind}[{i}].datatype {spec.datatype} but {path} has {arg.type}")
        if len(arg.shape) != len(spec.dims) + 1:
            raise ConfigError(
                f"{config.name}: {kind}[{i}].dims {spec.dims} + batch dim but {path} has shape {arg.shape}"
            )
