"""PyTorch backend: a TorchScript archive (`.pt`, torch.jit.save) or an exported program (`.pt2`,
torch.export.save). Inputs are passed positionally in the config's input order; a tensor, tuple or list
result is mapped to the config's outputs in order, a dict by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepfleet.batching.errors import ConfigError
from deepfleet.batching.repository import ModelConfig


class TorchBackend:
    def __init__(self, path: Path, config: ModelConfig, device: str = "cpu"):
        import torch

        self._torch = torch
        self._device = torch.device(device)
        if config.intra_op_threads:
            torch.set_num_threads(config.intra_op_threads)  # process-wide: torch has no per-model pool
        if path.suffix == ".pt2":
            self._module = torch.export.load(str(path)).module()
        else:
            self._module = torch.jit.load(str(path), map_location=self._device)
            self._module.eval()
        self._inputs = [s.name for s in config.inputs]
        self._outputs = [s.name for s in config.outputs]
        self._name = config.name

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self._device) for n in self._inputs]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            result = [result[n] for n in self._outputs]
        if len(result) != len(self._outputs):
            raise ConfigError(f"{self._name}: model returned {len(result)} outputs, config declares {self._outputs}")
        return {n: t.detach().cpu().numpy() for n, t in zip(self._outputs, result, strict=True)}

    def close(self) -> None:
        self._module = None
