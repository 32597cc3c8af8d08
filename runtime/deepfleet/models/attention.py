"""Paged attention: the one interface the models call.

The KV cache of a layer is `k_cache[num_blocks, block_size, kv_heads, k_dim]` (+ `v_cache` likewise, or None when
values are the first `v_dim` features of the keys, as in MLA's compressed cache). An FP8 cache
(engine.kv_cache_dtype fp8, deepfleet.quant.kv_cache) comes with float32 `k_scale`/`v_scale` per KV head: a
layer's cache entry is then (k_cache, v_cache, k_scale, v_scale). A batch is flattened: the first
`num_decodes` rows are sequences with one new token each, the rest are prefill chunks of any length.

New keys/values are first scattered into their cache slots. Then:
- on CUDA, one Triton kernel (`deepfleet.kernels.paged_attention`) attends every row of the step, decodes and
  prefill chunks over cached (chunked or prefix-hit) context alike, reading the KV blocks through the block tables:
  no gather copy, no width buckets, each KV head read once for its query group, and the KV sequence split across
  programs (flash-decoding) when the batch is too small to fill the GPU. It needs `query_start_loc` and
  `max_query_len` in the metadata and is CUDA-graph capturable. The kernel module documents its design.
  Exception: a pass of long prefill chunks only (each >= LONG_PREFILL_TOKENS, eager: such passes are not
  graph-captured) attends per chunk with torch SDPA (cuDNN or flash attention: ~550 vs ~220 TFLOP/s for the
  kernel on a fresh 8k prompt on an H200), a chunk over cached context on its blocks gathered into one tensor
  (a copy of its keys and values, small next to the attention) with a bottom-right causal mask.
- on CPU, the reference below, in plain PyTorch: decode rows attend in one batched SDPA over the blocks gathered
  from their block tables; prefill rows attend per sequence, straight on the fresh keys when nothing is cached
  before them (causal) or over gathered blocks otherwise. Grouped-query heads are handled by viewing the query as
  [kv_heads, group], so no key/value copy per head is made. The kernel tests (tests/unit/kernels, Triton's
  interpreter on CPU) and the GPU parity tests check the kernel against this reference."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepfleet import defaults
from deepfleet.quant import kv_cache


@dataclass
class AttentionMetadata:
    num_decodes: int
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of every new token
    context_lens: torch.Tensor  # [B] int32 on device: tokens in cache after this step, per sequence
    block_tables: torch.Tensor  # [B, W] int32 on device, padded with a valid (scratch) block
    block_size: int
    # prefill rows, host side: (query_len, context_len) per sequence, in batch order after the decodes
    prefills: list[tuple[int, int]]
    query_start_loc: torch.Tensor  # [B + 1] int32 on device: first query row of each sequence, then T
    max_query_len: int  # host side: the longest query of the step (1 = pure decode)
    _decode_mask: torch.Tensor | None = None  # built by the first layer, reused by the others

    def decode_mask(self, width: int, device: torch.device) -> torch.Tensor:
        """[n, 1, 1, width] True where a decode row's key position holds a token."""
        if self._decode_mask is None or self._decode_mask.shape[-1] != width:
            n = self.num_decodes
            mask = torch.arange(width, device=device)[None, :] < self.context_lens[:n, None]
            self._decode_mask = mask[:, None, None, :]
        return self._decode_mask


def write_kv(cache: torch.Tensor, new: torch.Tensor, slot_mapping: torch.Tensor,
             scale: torch.Tensor | None = None) -> None:
    """new [T, kv_heads, dim] into the cache slots; an FP8 cache stores new / scale (per KV head) in e4m3."""
    if cache.dtype == kv_cache.FP8:  # as bytes: index_copy_ has no float8 implementation on CPU
        cache, new = cache.view(torch.uint8), kv_cache.quantize(new, scale).view(torch.uint8)
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, new.to(cache.dtype))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """[..., W] block ids -> [..., W * block_size, heads, dim] in `dtype` (an FP8 cache's rows dequantized)"""
    if cache.dtype == kv_cache.FP8:  # indexed as bytes (no float8 indexing on CPU), then dequantized
        g = kv_cache.dequantize(cache.view(torch.uint8)[block_table].view(kv_cache.FP8), scale, dtype)
    else:
        g = cache[block_table]
    return g.flatten(-4, -3)


def _decode(q, k_cache, v_cache, v_dim, meta: AttentionMetadata, scale: float, k_scale, v_scale) -> torch.Tensor:
    n = meta.num_decodes
    kv_heads = k_cache.shape[2]
    group = q.shape[1] // kv_heads
    k = _gather(k_cache, meta.block_tables[:n], k_scale, q.dtype)  # [n, L, Hkv, Dk]
    v = k[..., :v_dim] if v_cache is None else _gather(v_cache, meta.block_tables[:n], v_scale, q.dtype)
    qg = q.view(n, kv_heads, group, q.shape[-1])  # the group's query heads act as the query "length"
    out = F.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.decode_mask(k.shape[1], q.device), scale=scale
    )
    return out.reshape(n, q.shape[1], v_dim)


def _prefill_one(q, k_new, v_new, k_cache, v_cache, v_dim, table, ctx, scale, k_scale, v_scale) -> torch.Tensor:
    qlen, heads = q.shape[0], q.shape[1]
    # nothing cached before this chunk: attend to the fresh keys (an FP8 cache's rounded ones, as the kernel does)
    if ctx == qlen and k_cache.dtype != kv_cache.FP8:
        k, v = k_new, (k_new[..., :v_dim] if v_new is None else v_new)
        mask, causal = None, True
    else:
        nblocks = -(-ctx // k_cache.shape[1])
        k = _gather(k_cache, table[:nblocks], k_scale, q.dtype)[:ctx]
        v = k[..., :v_dim] if v_cache is None else _gather(v_cache, table[:nblocks], v_scale, q.dtype)[:ctx]
        # query i sits at position ctx - qlen + i and sees keys up to there
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        mask, causal = torch.arange(ctx, device=q.device)[None, :] <= qpos, False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=heads != k.shape[1],
    )
    return out[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
    v_dim: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] or None (values inside the keys) -> [T, H, Dv].
    `k_scale`/`v_scale` [Hkv]: an FP8 cache's scales."""
    write_kv(k_cache, k, meta.slot_mapping, k_scale)
    if v is not None:
        write_kv(v_cache, v, meta.slot_mapping, v_scale)
    attend = _kernel_attention if q.is_cuda else reference_attention
    return attend(q, k, v, k_cache, v_cache, meta, scale, v_dim, k_scale, v_scale)


def rope_paged_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], rotary, num_heads: int,
                         num_kv_heads: int, head_dim: int, layer_cache: tuple, meta: AttentionMetadata,
                         scale: float) -> torch.Tensor:
    """Attention of the Qwen2/Llama layers from their fused QKV projection [T, (H + 2 Hkv) * D]: RoPE on q and k,
    the new keys/values into the cache, paged attention -> [T, H, D]. On CUDA the rotation and the cache write are
    one kernel (deepfleet.kernels.rope_cache), except into an FP8 cache; on CPU, `rotary` and `paged_attention`
    (the reference)."""
    t = qkv.shape[0]
    k_cache, v_cache, *scales = layer_cache  # (+ k_scale, v_scale for an FP8 cache)
    if qkv.is_cuda and not rotary.interleaved and k_cache.dtype != kv_cache.FP8:
        q, k = _rope_cache_kernel()(qkv, *rope, num_heads, num_kv_heads, k_cache, v_cache, meta.slot_mapping)
        v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(t, num_kv_heads, head_dim)
        return _kernel_attention(q, k, v, k_cache, v_cache, meta, scale, head_dim, *scales)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = rotary(rope, q.view(t, num_heads, head_dim), k.view(t, num_kv_heads, head_dim))
    return paged_attention(q, k, v.view(t, num_kv_heads, head_dim), k_cache, v_cache, meta, scale, head_dim,
                           *scales)


@functools.cache
def _rope_cache_kernel():
    from deepfleet.kernels.rope_cache import rope_write_kv  # imports triton: only where there is a GPU

    return rope_write_kv


@functools.cache
def _triton_kernel():
    from deepfleet.kernels.paged_attention import paged_attention  # imports triton: only where there is a GPU

    return paged_attention


def _kernel_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, v_dim: int,
                      k_scale=None, v_scale=None) -> torch.Tensor:
    if is_long_prefill(meta) and v is not None and q.shape[-1] == v_dim and k_cache.dtype != kv_cache.FP8:
        return long_prefill_attention(q, k, v, k_cache, v_cache, meta, scale)
    return _triton_kernel()(q, k_cache, v_cache, v_dim, meta.block_tables, meta.context_lens, meta.query_start_loc,
                            meta.max_query_len, scale, k_scale=k_scale, v_scale=v_scale)


def is_long_prefill(meta: AttentionMetadata) -> bool:
    """A pass of prefill chunks only, each at least LONG_PREFILL_TOKENS long."""
    return (meta.num_decodes == 0 and bool(meta.prefills)
            and all(n >= defaults.LONG_PREFILL_TOKENS for n, _ in meta.prefills))


@functools.cache
def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    # cuDNN first (fastest on Hopper for fresh causal prompts); flash where cuDNN refuses the inputs (the
    # bottom-right causal mask of a chunk over cached context)
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def long_prefill_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Prefill chunks (no decodes) one by one through torch SDPA: fresh chunks causal on their new keys, chunks over
    cached context on their gathered blocks with a bottom-right causal mask. Caches already hold the new keys."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    parts, start = [], 0
    with sdpa_kernel(_sdpa_backends(), set_priority=True):
        for i, (qlen, ctx) in enumerate(meta.prefills):
            end = start + qlen
            if ctx == qlen:
                keys, values, mask, causal = k[start:end], v[start:end], None, True
            else:
                blocks = meta.block_tables[i, : -(-ctx // k_cache.shape[1])]
                keys = _gather(k_cache, blocks, None, q.dtype)[:ctx]
                values = _gather(v_cache, blocks, None, q.dtype)[:ctx]
                mask, causal = causal_lower_right(qlen, ctx), False
            out = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != keys.shape[1])
            parts.append(out[0].transpose(0, 1))
            start = end
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def reference_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, v_dim: int,
                        k_scale=None, v_scale=None) -> torch.Tensor:
    """The plain-PyTorch implementation (CPU), over caches that already hold this step's keys/values."""
    n = meta.num_decodes
    if not meta.prefills:
        return _decode(q, k_cache, v_cache, v_dim, meta, scale, k_scale, v_scale)
    parts = [_decode(q[:n], k_cache, v_cache, v_dim, meta, scale, k_scale, v_scale)] if n else []
    start = n
    for i, (qlen, ctx) in enumerate(meta.prefills):
        end = start + qlen
        parts.append(
            _prefill_one(
                q[start:end], k[start:end], None if v is None else v[start:end],
                k_cache, v_cache, v_dim, meta.block_tables[n + i], ctx, scale, k_scale, v_scale,
            )
        )
        start = end
    return torch.cat(parts) if len(parts) > 1 else parts[0]
