"""Which adapters may be asked for, which of them hold a slot, and putting one into the served model.

An adapter is *loaded* (registered: a request's `model` may name it) once checked against the model: every tensor
must name a decoder layer the model has and fit that projection's shape, otherwise it was trained for another base
model and is refused saying where it does not fit. `max_loras` slots exist from start-up (lora/layers.py); a loaded
adapter is *resident* while it holds one, and every resident adapter can be in the same batch. Loading takes a
free slot when there is one and never evicts. A request for an adapter that is loaded but not resident places it
(read again from its directory and checked again): into a free slot, else into the slot of the least recently used
resident adapter that serves no unfinished request, which stays loaded and comes back the same way when asked for.
When every slot serves unfinished requests, the request is refused for now (SlotsBusy: HTTP 503 + Retry-After)."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from deepfleet.engine.errors import SlotsBusy
from deepfleet.lora import layers
from deepfleet.lora.adapter import AdapterError, LoRAAdapter, read_adapter

_generation = itertools.count(1)


@dataclass(frozen=True)
class Resident:
    name: str
    path: Path
    slot: int
    rank: int
    cache_salt: bytes  # roots the prefix-cache hashes of its requests: no KV is shared across adapters or placements


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        self.max_loras, self.max_rank = max_loras, max_rank
        self.null_slot = max_loras  # the zero slot: tokens of requests without an adapter
        self.num_layers = len(model.model.layers)
        self.modules = layers.attach(model, max_loras, max_rank)
        self.loaded: dict[str, Path] = {}  # name -> the directory it is read from
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # least recently used first

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

    def _read(self, name: str, path: Path) -> LoRAAdapter:
        adapter = read_adapter(name, path, self.max_rank)
        self._check_fits(adapter)
        return adapter

    def _free_slot(self) -> int | None:
        used = {r.slot for r in self.resident.values()}
        return next((s for s in range(self.max_loras) if s not in used), None)

    def _place(self, adapter: LoRAAdapter, slot: int) -> Resident:
        """Into a slot of zeros (never used, or cleared by _evict): projections the adapter leaves out add nothing."""
        for (layer, module), (a, b) in adapter.weights.items():
            path_in_layer, shard = layers.TARGETS[module]
            target = self.modules[(layer, path_in_layer)]
            target.set_slot(slot, shard, a.to(target.lora_a.dtype), b.to(target.lora_b.dtype))
        resident = Resident(adapter.name, adapter.path, slot, adapter.rank,
                            f"lora:{adapter.name}:{next(_generation)}".encode())
        self.resident[adapter.name] = resident
        return resident

    def _evict(self, name: str) -> None:
        resident = self.resident.pop(name)
        for module in self.modules.values():
            module.clear_slot(resident.slot)

    def load(self, name: str, path: str | Path) -> None:
        """Check and register the adapter; resident at once if a slot is free (a load evicts nothing)."""
        if name in self.loaded:
            raise AdapterError(f"LoRA adapter {name!r}: already loaded (from {self.loaded[name]})")
        adapter = self._read(name, Path(path))
        self.loaded[name] = Path(path)
        slot = self._free_slot()
        if slot is not None:
            self._place(adapter, slot)

    def acquire(self, name: str, busy_slots: set[int]) -> Resident:
        """The adapter's slot for a new request (it becomes the most recently used), placing the adapter first if
        it is not resident. `busy_slots`: the slots unfinished requests use, which are never taken. Raises
        AdapterError (not loaded; its directory no longer holds a servable adapter) or SlotsBusy."""
        if name not in self.loaded:
            loaded = ", ".join(sorted(self.loaded)) or "none"
            raise AdapterError(f"LoRA adapter {name!r}: not loaded (loaded: {loaded})")
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name]
        slot = self._free_slot()
        victim = None
        if slot is None:
            victim = next((r for r in self.resident.values() if r.slot not in busy_slots), None)
            if victim is None:
                raise SlotsBusy(f"model: LoRA adapter {name!r} is loaded but not resident, and all max_loras "
                                f"{self.max_loras} adapter slots serve unfinished requests "
                                f"({', '.join(self.resident)}); retry later")
            slot = victim.slot
        adapter = self._read(name, self.loaded[name])  # before the eviction: a broken directory costs no one a slot
        if victim is not None:
            self._evict(victim.name)
        return self._place(adapter, slot)

    def unload(self, name: str) -> None:
        self.get(name)
        if name in self.resident:
            self._evict(name)
        del self.loaded[name]

    def get(self, name: str) -> Path:
        """The directory of a loaded adapter."""
        if name not in self.loaded:
            loaded = ", ".join(sorted(self.loaded)) or "none"
            raise AdapterError(f"LoRA adapter {name!r}: not loaded (loaded: {loaded})")
        return self.loaded[name]
