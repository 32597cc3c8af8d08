"""Does a model fit a GPU type at a tensor-parallel size, and how many sequences of a given context then run at
once: the engine's KV budget (`deepfleet.engine.memory`) applied to the footprint's estimated peak."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deepfleet import defaults
from deepfleet.engine import memory
from deepfleet.plan.footprint import KV_DTYPE_BYTES, Footprint, activation_bytes, kv_layout_per_gpu
from deepfleet.plan.hardware import GPU, UNIFIED_HOST_RESERVE_BYTES

TP_SIZES = (1, 2, 4, 8)
# What the CUDA context and the allocator hold outside torch's tensors on one GPU (the engine measures it as
# "used elsewhere"; estimate)
CUDA_CONTEXT_BYTES = 512 << 20
HOST_RAM_FACTORS = (1.5, 3.0)  # source documents: host RAM 1.5-3x the model
NVME_COPIES = 2  # the served checkpoint plus the next version staged beside it during a rolling update


@dataclass
class Placement:
    gpu: str
    tp: int
    weights_per_gpu: int
    activation_per_gpu: int
    profile_peak_per_gpu: int  # what the engine's start-up profile should measure: weights + prefill + its KV
    kv_budget_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    num_kv_blocks: int
    kv_tokens: int
    max_seqs: int  # sequences of `context` tokens whose KV fits at once
    engine_max_num_seqs: int  # what the engine would pick by default from this many blocks
    fits: bool
    why: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def valid_tp(fp: Footprint, g: GPU, tp: int) -> str | None:
    """None when `tp` is usable, else why not."""
    if tp > g.max_per_host:
        return f"{g.name}: at most {g.max_per_host} per host"
    if fp.cfg.num_heads % tp:
        return f"{fp.cfg.num_heads} attention heads do not split over {tp} GPUs"
    return None


def place(fp: Footprint, g: GPU, tp: int, context: int, memory_utilization: float = defaults.GPU_MEMORY_UTILIZATION,
          block_size: int = defaults.KV_BLOCK_SIZE,
          max_num_batched_tokens: int | None = None) -> Placement:
    """`max_num_batched_tokens` None: the engine's default on this GPU."""
    if max_num_batched_tokens is None:
        max_num_batched_tokens = memory.default_max_num_batched_tokens(g.memory_bytes)
    weights = math.ceil(fp.sharded_bytes / tp) + fp.replicated_bytes
    layout = kv_layout_per_gpu(fp.kv_layout, tp)
    per_token = memory.kv_block_bytes(layout, fp.num_layers, 1, KV_DTYPE_BYTES)
    profile_tokens = min(max_num_batched_tokens, context)
    act = activation_bytes(fp.cfg, profile_tokens, tp)
    # the engine's profile run holds the weights, the prefill's activations and that prefill's own KV blocks
    peak = weights + act + math.ceil(profile_tokens / block_size) * block_size * per_token
    elsewhere = CUDA_CONTEXT_BYTES + (UNIFIED_HOST_RESERVE_BYTES if g.unified else 0)
    budget = memory.kv_budget_bytes(g.memory_bytes, memory_utilization, elsewhere, peak)
    blocks = memory.num_kv_blocks(budget, memory.kv_block_bytes(layout, fp.num_layers, block_size, KV_DTYPE_BYTES))
    per_seq = math.ceil(context / block_size)
    seqs = blocks // per_seq
    if seqs >= 1:
        why = f"{seqs} x {context}-token sequences"
    elif budget <= 0:
        overhead = elsewhere + defaults.GPU_MEMORY_RESERVE_BYTES
        why = (f"weights {weights / 2**30:.1f} GiB + activations {act / 2**30:.1f} GiB + context/reserve "
               f"{overhead / 2**30:.1f} GiB per GPU exceed {memory_utilization:.0%} of "
               f"{g.memory_bytes / 2**30:.1f} GiB")
    else:
        why = f"KV for one {context}-token sequence needs {per_seq} blocks, {blocks} fit"
    return Placement(gpu=g.key, tp=tp, weights_per_gpu=weights, activation_per_gpu=act, profile_peak_per_gpu=peak,
                     kv_budget_per_gpu=max(0, int(budget)), kv_bytes_per_token_per_gpu=per_token, num_kv_blocks=blocks,
                     kv_tokens=blocks * block_size, max_seqs=seqs,
                     engine_max_num_seqs=memory.default_max_num_seqs(blocks, block_size) if blocks else 0,
                     fits=seqs >= 1, why=why)


def host_requirements(fp: Footprint) -> dict:
    lo, hi = HOST_RAM_FACTORS
    return {"host_ram_bytes_min": int(fp.weight_bytes * lo), "host_ram_bytes_max": int(fp.weight_bytes * hi),
            "nvme_bytes": fp.weight_bytes * NVME_COPIES}
