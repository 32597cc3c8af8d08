"""The SDPA route for passes of long prefill chunks (models/attention.py) against softmax attention in float64
written out here: a fresh chunk (causal on its own keys) and a chunk over cached context (keys read through a
block table in random order, the chunk's queries at the end of the sequence), GQA 12/2. Runs on CPU (torch's
math SDPA); on a GPU host the engine takes the same function with cuDNN / flash attention."""

import math

import torch

from deepfleet import defaults
from deepfleet.models.attention import AttentionMetadata, is_long_prefill, long_prefill_attention


def _meta(block_tables, prefills, num_decodes=0):
    return AttentionMetadata(num_decodes=num_decodes, slot_mapping=torch.empty(0, dtype=torch.long),
                             context_lens=torch.tensor([c for _, c in prefills], dtype=torch.int32),
                             block_tables=block_tables, block_size=16, prefills=prefills,
                             query_start_loc=torch.empty(0, dtype=torch.int32),
                             max_query_len=max(n for n, _ in prefills))


def _expected(q, keys, values, scale):
    """q [n, H, D] at the last n positions of keys/values [ctx, Hkv, D], causal, float64."""
    n, heads, _ = q.shape
    ctx, kv_heads, _ = keys.shape
    group = heads // kv_heads
    out = torch.empty(n, heads, values.shape[-1], dtype=torch.float64)
    for i in range(n):
        seen = ctx - n + i + 1
        for h in range(heads):
            s = (keys[:seen, h // group].double() @ q[i, h].double()) * scale
            out[i, h] = torch.softmax(s, 0) @ values[:seen, h // group].double()
    return out


def test_fresh_and_cached_chunks_match_float64_attention():
    g = torch.Generator().manual_seed(5)
    heads, kv_heads, dim, bs = 12, 2, 16, 16
    fresh, (chunk, ctx) = 37, (21, 70)  # the second sequence has 49 tokens cached before its 21-token chunk
    blocks_needed = math.ceil(ctx / bs)
    num_blocks = blocks_needed + 4
    k_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=g)
    table = torch.randperm(num_blocks, generator=g)[:blocks_needed]
    block_tables = torch.stack([torch.arange(8), torch.cat([table, table[:8 - blocks_needed]])]).int()
    q = torch.randn(fresh + chunk, heads, dim, generator=g)
    k_new = torch.randn(fresh + chunk, kv_heads, dim, generator=g)
    v_new = torch.randn(fresh + chunk, kv_heads, dim, generator=g)
    # the cache holds the cached chunk's new keys already (as after write_kv)
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    slots = (table[torch.arange(ctx) // bs] * bs + torch.arange(ctx) % bs)
    flat_k[slots[ctx - chunk :]] = k_new[fresh:]
    flat_v[slots[ctx - chunk :]] = v_new[fresh:]
    scale = dim**-0.5

    out = long_prefill_attention(q, k_new, v_new, k_cache, v_cache, _meta(block_tables, [(fresh, fresh), (chunk, ctx)]),
                                 scale)

    expected = torch.cat([_expected(q[:fresh], k_new[:fresh], v_new[:fresh], scale),
                          _expected(q[fresh:], flat_k[slots], flat_v[slots], scale)])
    assert out.shape == (fresh + chunk, heads, dim)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_only_passes_of_long_chunks_take_the_sdpa_route():
    long = defaults.LONG_PREFILL_TOKENS
    tables = torch.zeros(2, 1, dtype=torch.int32)
    assert is_long_prefill(_meta(tables, [(long, long), (long, 3 * long)]))
    assert not is_long_prefill(_meta(tables, [(long, long), (long - 1, long - 1)]))  # a short chunk in the pass
    assert not is_long_prefill(_meta(tables, [(long, long)], num_decodes=1))  # decodes in the same pass
