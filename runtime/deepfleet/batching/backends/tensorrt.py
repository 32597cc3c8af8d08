"""TensorRT backend (TensorRT 10 Python API), import-gated: the `tensorrt` wheels need an NVIDIA GPU
host and cannot be installed on the build machines. The full path is here — engine build from an ONNX
export of a PyTorch model (FP16, 1 GiB workspace, one optimization profile covering the config's dynamic
dims), engine deserialization, input shapes bound per batch, execute_async_v3 — and is unit-tested
against a fake `tensorrt` module; it has not been run against real TensorRT.

Device memory goes through a small `DeviceMemory` object (torch CUDA tensors by default) so the tests
can substitute host memory."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from deepfleet.batching.errors import BackendUnavailable, ConfigError
from deepfleet.batching.repository import ModelConfig

WORKSPACE_BYTES = 1 << 30  # source documents: TensorRT FP16 engine, workspace 1 GiB


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "backend 'tensorrt' needs the NVIDIA tensorrt package (GPU hosts only: pip install tensorrt)"
        ) from exc
    return tensorrt


def profile_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input: batch 1..max_batch_size, named dims over their buckets. The batcher
    pads named dims to bucket sizes, so these bounds cover every shape it can send."""
    shapes = {}
    for i, spec in enumerate(config.inputs):
        lo, opt, hi = [1], [config.max_batch_size], [config.max_batch_size]
        for d in spec.dims:
            if d == -1:
                raise ConfigError(
                    f"{config.name}: inputs[{i}].dims: tensorrt needs bounded dims; declare -1 as a named "
                    "dynamic dim with buckets"
                )
            if isinstance(d, str):
                buckets = config.dynamic_dims[d].buckets
                lo.append(buckets[0])
                opt.append(buckets[len(buckets) // 2])
                hi.append(buckets[-1])
            else:
                lo.append(d)
                opt.append(d)
                hi.append(d)
        shapes[spec.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def build_engine(
    onnx_path: Path, plan_path: Path, config: ModelConfig, *, fp16: bool = True,
    workspace_bytes: int = WORKSPACE_BYTES, trt: ModuleType | None = None,
) -> Path:
    """Compile an ONNX export (e.g. torch.onnx.export with a dynamic batch axis) into a serialized engine."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"{onnx_path}: TensorRT could not parse the ONNX model: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        builder_config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(config).items():
        profile.set_shape(name, lo, opt, hi)
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise ConfigError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    return Path(plan_path)


class DeviceMemory(Protocol):
    stream_handle: int

    def to_device(self, array: np.ndarray) -> Any: ...

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any: ...

    def address(self, buffer: Any) -> int: ...

    def to_host(self, buffer: Any) -> np.ndarray: ...

    def synchronize(self) -> None: ...


class TorchCudaMemory:
    """Device buffers as torch CUDA tensors, all work on one CUDA stream."""

    def __init__(self, device: int = 0):
        import torch

        self._torch = torch
        self._device = torch.device("cuda", device)
        self._stream = torch.cuda.Stream(self._device)
        self.stream_handle = self._stream.cuda_stream

    def to_device(self, array: np.ndarray):
        with self._torch.cuda.stream(self._stream):
            return self._torch.from_numpy(array).to(self._device, non_blocking=False)

    def empty(self, shape, dtype):
        torch_dtype = self._torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        with self._torch.cuda.stream(self._stream):
            return self._torch.empty(shape, dtype=torch_dtype, device=self._device)

    def address(self, buffer) -> int:
        return buffer.data_ptr()

    def to_host(self, buffer) -> np.ndarray:
        return buffer.cpu().numpy()

    def synchronize(self) -> None:
        self._stream.synchronize()


class TensorRTBackend:
    def __init__(
        self, path: Path, config: ModelConfig, *, trt: ModuleType | None = None, memory: DeviceMemory | None = None
    ):
        trt = trt or import_tensorrt()
        self._memory = memory or TorchCudaMemory()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self._engine is None:
            raise ConfigError(f"{path}: TensorRT could not deserialize the engine (built for another GPU/version?)")
        self._context = self._engine.create_execution_context()
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        for kind, specs, mode in (("inputs", config.inputs, trt.TensorIOMode.INPUT),
                                  ("outputs", config.outputs, trt.TensorIOMode.OUTPUT)):
            for i, spec in enumerate(specs):
                if modes.get(spec.name) != mode:
                    raise ConfigError(f"{config.name}: {kind}[{i}].name '{spec.name}' is not an engine {kind[:-1]}")
        self._profiles = {s.name: engine.get_tensor_profile_shape(s.name, 0) for s in config.inputs}
        self._outputs = [s.name for s in config.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        memory, context = self._memory, self._context
        keep = []  # device buffers must outlive the launch
        for name, array in inputs.items():
            lo, _, hi = (tuple(s) for s in self._profiles[name])
            if not all(a <= n <= b for a, n, b in zip(lo, array.shape, hi, strict=True)):
                raise ValueError(f"input '{name}' shape {list(array.shape)} is outside the engine profile {lo}..{hi}")
            buffer = memory.to_device(np.ascontiguousarray(array, dtype=self._dtypes[name]))
            keep.append(buffer)
            if not context.set_input_shape(name, tuple(array.shape)):
                raise ValueError(f"TensorRT rejected shape {list(array.shape)} for input '{name}'")
            context.set_tensor_address(name, memory.address(buffer))
        outputs = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"output '{name}' shape {shape} is unresolved after binding the inputs")
            outputs[name] = memory.empty(shape, self._dtypes[name])
            context.set_tensor_address(name, memory.address(outputs[name]))
        if not context.execute_async_v3(memory.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        memory.synchronize()
        return {name: memory.to_host(buffer) for name, buffer in outputs.items()}

    def close(self) -> None:
        self._context = self._engine = self._runtime = None
