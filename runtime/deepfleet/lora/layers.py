"""The base model's projections with adapter slots beside them.

Each LoRA-able projection (qkv_proj, o_proj, gate_up_proj, down_proj of every decoder layer) is wrapped once at
start-up: `max_loras` slots of A [shards·max_rank, in] and B [out, max_rank], plus one last slot of zeros that
means "no adapter". Smaller ranks are zero-padded, so every slot has the same shape and a CUDA graph captured
once serves any mix of adapters. The token→slot map of the step is a device tensor the model runner fills before
each forward (`set_token_slots`); a graph reads the same buffer at replay."""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.kernels.lora_ops import lora_add
from deepfleet.models.base import FUSED_PROJECTIONS
from deepfleet.models.layers import Linear

# projection in the checkpoint -> (path of the module in the decoder layer, shard of it)
TARGETS = {name: (("self_attn." if name[0] in "qkv" else "mlp.") + fused, shard)
           for name, (fused, shard) in FUSED_PROJECTIONS.items()}
TARGETS.update({"o_proj": ("self_attn.o_proj", 0), "down_proj": ("mlp.down_proj", 0)})

_token_slots: torch.Tensor | None = None


def set_token_slots(slots: torch.Tensor) -> None:
    """The adapter slot of every token of the forward about to run (int64, [tokens])."""
    global _token_slots
    _token_slots = slots


class LoRALinear(nn.Module):
    def __init__(self, base: Linear, max_loras: int, max_rank: int):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.shard_sizes, self.shard_offsets = list(base.shard_sizes), list(base.shard_offsets)
        self.max_rank = max_rank
        dtype, device = base.weight.dtype, base.weight.device
        n = len(self.shard_sizes)
        self.register_buffer("lora_a", torch.zeros(max_loras + 1, n * max_rank, self.in_features, dtype=dtype,
                                                   device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras + 1, self.out_features, max_rank, dtype=dtype,
                                                   device=device), persistent=False)

    def set_slot(self, slot: int, shard: int, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        lo = self.shard_offsets[shard]
        self.lora_a[slot, shard * self.max_rank : shard * self.max_rank + r].copy_(a)
        self.lora_b[slot, lo : lo + self.shard_sizes[shard], :r].copy_(b)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_add(self.base(x), x, self.lora_a, self.lora_b, _token_slots, self.shard_offsets)


def attach(model: nn.Module, max_loras: int, max_rank: int) -> dict[tuple[int, str], LoRALinear]:
    """Wrap the projections of every decoder layer; returns (layer, module path) -> its wrapper."""
    wrapped = {}
    for i, layer in enumerate(model.model.layers):
        for path in {p for p, _ in TARGETS.values()}:
            parent_path, attr = path.split(".")
            parent = getattr(layer, parent_path)
            base = getattr(parent, attr)
            if not isinstance(base, Linear):
                raise ValueError(f"LoRA: layer {i} {path} is a {type(base).__name__}; adapters apply to the "
                                 "unquantized single-device projections only")
            wrapped[(i, path)] = LoRALinear(base, max_loras, max_rank)
            setattr(parent, attr, wrapped[(i, path)])
    return wrapped
