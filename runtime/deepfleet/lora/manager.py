"""Which adapter lives in which slot, and loading one into the served model.

`max_loras` slots exist from start-up (lora/layers.py); an adapter takes a free one when loaded and gives it back
when unloaded, so every resident adapter can be in the same batch. An adapter is checked against the model before
any slot is touched: every tensor must name a decoder layer the model has and fit that projection's shape,
otherwise it was trained for another base model and is refused saying where it does not fit."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from deepfleet.lora import layers
from deepfleet.lora.adapter import AdapterError, LoRAAdapter, read_adapter

_generation = itertools.count(1)


@dataclass(frozen=True)
class Resident:
    name: str
    path: Path
    slot: int
    rank: int
    cache_salt: bytes  # roots the prefix-cache hashes of its requests: no KV is shared across adapters or loads


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        self.max_loras, self.max_rank = max_loras, max_rank
        self.null_slot = max_loras  # the zero slot: tokens of requests without an adapter
        self.num_layers = len(model.model.layers)
        self.modules = layers.attach(model, max_loras, max_rank)
        self.resident: dict[str, Resident] = {}

    def _check_fits(self, adapter: LoRAAdapter) -> None:
        base = f" (the adapter's base_model_name_or_path: {adapter.base_model})" if adapter.base_model else ""
        for (layer, module), (a, b) in adapter.weights.items():
            if layer >= self.num_layers:
                raise AdapterError(f"LoRA adapter {adapter.name!r}: base model mismatch: it has weights for layer "
                                   f"{layer}, the served model has {self.num_layers} layers{base}")
            path, shard = layers.TARGETS[module]
            target = self.modules[(layer, path)]
            want_in, want_out = target.in_features, target.shard_sizes[shard]
            if a.shape[1] != want_in or b.shape[0] != want_out:
                raise AdapterError(
                    f"LoRA adapter {adapter.name!r}: base model mismatch: layer {layer} {module} maps {a.shape[1]} "
                    f"-> {b.shape[0]} features, the served model's maps {want_in} -> {want_out}{base}")

    def load(self, name: str, path: str | Path) -> Resident:
        if name in self.resident:
            raise AdapterError(f"LoRA adapter {name!r}: already loaded (from {self.resident[name].path})")
        adapter = read_adapter(name, path, self.max_rank)
        self._check_fits(adapter)
        used = {r.slot for r in self.resident.values()}
        free = [s for s in range(self.max_loras) if s not in used]
        if not free:
            raise AdapterError(f"LoRA adapter {name!r}: max_loras {self.max_loras} adapters are already loaded "
                               f"({', '.join(sorted(self.resident))}): unload one first")
        slot = free[0]
        for module in self.modules.values():
            module.clear_slot(slot)
        for (layer, module), (a, b) in adapter.weights.items():
            path_in_layer, shard = layers.TARGETS[module]
            target = self.modules[(layer, path_in_layer)]
            target.set_slot(slot, shard, a.to(target.lora_a.dtype), b.to(target.lora_b.dtype))
        resident = Resident(name, Path(path), slot, adapter.rank, f"lora:{name}:{next(_generation)}".encode())
        self.resident[name] = resident
        return resident

    def unload(self, name: str) -> None:
        resident = self.get(name)
        for module in self.modules.values():
            module.clear_slot(resident.slot)
        del self.resident[name]

    def get(self, name: str) -> Resident:
        if name not in self.resident:
            loaded = ", ".join(sorted(self.resident)) or "none"
            raise AdapterError(f"LoRA adapter {name!r}: not loaded (loaded: {loaded})")
        return self.resident[name]
