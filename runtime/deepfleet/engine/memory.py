"""How the engine sizes its KV cache, as plain arithmetic over bytes: one block's size from the model's cache
layout, the KV budget left on a GPU after weights, the profiled peak and the reserve, and the default
max_num_seqs. The model runner applies these to measured figures; `deepfleet plan` applies the same functions to
estimated ones, so the planner and the engine cannot drift apart."""

from __future__ import annotations

from deepfleet import defaults

# (kv heads, key dim, value dim or None when values are part of the cached keys, as in MLA's latent cache)
KVLayout = tuple[int, int, int | None]


def kv_bytes_per_token_per_layer(layout: KVLayout, dtype_bytes: int) -> int:
    heads, k_dim, v_dim = layout
    return heads * (k_dim + (v_dim or 0)) * dtype_bytes


def kv_block_bytes(layout: KVLayout, num_layers: int, block_size: int, dtype_bytes: int) -> int:
    return num_layers * block_size * kv_bytes_per_token_per_layer(layout, dtype_bytes)


def kv_budget_bytes(total: int, memory_utilization: float, used_elsewhere: int, peak: int) -> float:
    """GPU bytes left for KV blocks: the usable share of the card, less what other processes and the CUDA context
    hold, the profiled peak (weights + the largest prefill's activations) and a reserve for sampler buffers and
    CUDA graphs."""
    return total * memory_utilization - used_elsewhere - peak - defaults.GPU_MEMORY_RESERVE_BYTES


def num_kv_blocks(budget_bytes: float, block_bytes: int) -> int:
    return max(0, int(budget_bytes // block_bytes))


def default_max_num_seqs(num_blocks: int, block_size: int, cap: int = defaults.MAX_NUM_SEQS_GPU_CAP) -> int:
    """GPU default when max_num_seqs is unset: one sequence per GPU_TOKENS_PER_SEQ cached tokens, capped."""
    return max(1, min(cap, num_blocks * block_size // defaults.GPU_TOKENS_PER_SEQ))


def default_max_num_batched_tokens(gpu_memory_bytes: int | None) -> int:
    """The step's token budget when engine.max_num_batched_tokens is unset; `gpu_memory_bytes` None: no GPU."""
    large = gpu_memory_bytes is not None and gpu_memory_bytes >= defaults.LARGE_GPU_BYTES
    return defaults.MAX_NUM_BATCHED_TOKENS_LARGE_GPU if large else defaults.MAX_NUM_BATCHED_TOKENS


def sampler_bytes(max_num_seqs: int, vocab_size: int) -> int:
    """Taken from the KV budget once max_num_seqs is known: the float32 logits of the largest decode graph (the LM
    head runs inside it) and the sampler's full-vocabulary float32 temporaries for a batch that size."""
    return max_num_seqs * vocab_size * 4 * (1 + defaults.SAMPLER_VOCAB_TEMPORARIES)
