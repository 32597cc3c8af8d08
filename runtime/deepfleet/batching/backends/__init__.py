"""Backends by name. Each is imported only when a model uses it, so a host needs only the packages of the
backends its repository names (tensorrt in particular exists only on GPU hosts)."""

from __future__ import annotations

from deepfleet.batching.backends.base import Backend
from deepfleet.batching.repository import ModelEntry


def load_backend(entry: ModelEntry) -> Backend:
    config, path = entry.config, entry.model_path
    if config.backend == "onnxruntime":
        from deepfleet.batching.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, config)
    if config.backend == "torch":
        from deepfleet.batching.backends.torch import TorchBackend

        return TorchBackend(path, config)
    from deepfleet.batching.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(path, config)
