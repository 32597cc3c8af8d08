"""Rotary position embedding of q and k and the KV-cache write of the new keys and values, in one Triton kernel.

Input is the fused QKV projection's output row per token, `[q heads | k heads | v heads] x head_dim`, and the
step's (cos, sin) rows (models/layers.py `RotaryEmbedding.lookup`, already in the activation dtype). One program per
token rotates every q and k head of its row (GPT-NeoX/Qwen/Llama halves: (x1, x2) -> (x1 cos - x2 sin,
x2 cos + x1 sin), in float32, rounded once to the dtype), writes the rotated q and k, and stores the rotated key
and the value into the token's cache slot (`slot_mapping`: block * block_size + offset; a padding token's slot is
the scratch block's), in the cache's dtype. FP8 caches are not written here (models/attention.py keeps the
unfused rotation and write for them): an in-kernel e4m3 write failed its exact comparison with
deepfleet.quant.kv_cache.quantize on the H200 (2026-12-02; which elements was not captured; Triton's approximate
float32 division is the suspect, tl.math.div_rn the fix to try on a GPU).

That replaces four launches per layer (rotate q, rotate k, two cache writes) and the copies between them; the
attention kernel then reads the cache, and the rotated k is returned for the callers that attend on the fresh keys
(the long-prefill SDPA route)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepfleet.kernels import pdl


@triton.jit
def _rope_cache_kernel(
    q_out, k_out, qkv, cos, sin, k_cache, v_cache, slot_mapping,
    stride_t, stride_cos, stride_sin, stride_qo, stride_ko, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
    stride_vh,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, ROT_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    row = qkv + t * stride_t
    h = tl.arange(0, ROT_HEADS_PAD)  # q heads, then k heads
    d = tl.arange(0, HALF_PAD)
    d_ok = d < HALF
    ok = (h < HEADS + KV_HEADS)[:, None] & d_ok[None, :]
    first = row + h[:, None] * (2 * HALF) + d[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos + t * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin + t * stride_sin + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    dtype = q_out.dtype.element_ty
    r1 = (x1 * c - x2 * s).to(dtype)
    r2 = (x2 * c + x1 * s).to(dtype)

    is_q = (h < HEADS)[:, None] & d_ok[None, :]
    q_ptr = q_out + t * stride_qo + h[:, None] * (2 * HALF) + d[None, :]
    tl.store(q_ptr, r1, mask=is_q)
    tl.store(q_ptr + HALF, r2, mask=is_q)
    kh = h - HEADS
    is_k = ok & (h >= HEADS)[:, None]
    k_ptr = k_out + t * stride_ko + kh[:, None] * (2 * HALF) + d[None, :]
    tl.store(k_ptr, r1, mask=is_k)
    tl.store(k_ptr + HALF, r2, mask=is_k)

    slot = tl.load(slot_mapping + t)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    kc = k_cache + block * stride_kb + offset * stride_ks + kh[:, None] * stride_kh + d[None, :]
    vh = tl.arange(0, KV_HEADS_PAD)
    dv = tl.arange(0, 2 * HALF_PAD)
    v_ok = (vh < KV_HEADS)[:, None] & (dv < 2 * HALF)[None, :]
    v = tl.load(row + (HEADS + KV_HEADS + vh[:, None]) * (2 * HALF) + dv[None, :], mask=v_ok, other=0.0)
    vc = v_cache + block * stride_vb + offset * stride_vs + vh[:, None] * stride_vh + dv[None, :]
    tl.store(kc, r1.to(k_cache.dtype.element_ty), mask=is_k)
    tl.store(kc + HALF, r2.to(k_cache.dtype.element_ty), mask=is_k)
    tl.store(vc, v.to(v_cache.dtype.element_ty), mask=v_ok)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (heads + 2 kv_heads) * head_dim], cos/sin [T, head_dim / 2] (any leading view, e.g. [T, 1, D/2])
    -> (q [T, heads, D], k [T, kv_heads, D]) rotated; the rotated keys and the values are stored in the caches
    [blocks, block_size, kv_heads, D] at `slot_mapping` [T] (int64); FP8 caches are refused."""
    tokens = qkv.shape[0]
    _, block_size, cache_heads, head_dim = k_cache.shape
    cos, sin = cos.reshape(tokens, -1), sin.reshape(tokens, -1)
    if (qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(1) != 1
            or cache_heads != num_kv_heads or head_dim % 2 or cos.shape[1] != head_dim // 2):
        raise ValueError(f"rope_write_kv: qkv {tuple(qkv.shape)} with {num_heads}/{num_kv_heads} heads, cos "
                         f"{tuple(cos.shape)} and cache {tuple(k_cache.shape)} do not fit")
    if k_cache.dtype == torch.float8_e4m3fn:
        raise ValueError("rope_write_kv: FP8 KV caches are written by the unfused path (models/attention.py)")
    q = qkv.new_empty(tokens, num_heads, head_dim)
    k = qkv.new_empty(tokens, num_kv_heads, head_dim)
    if tokens:
        _rope_cache_kernel[(tokens,)](
            q, k, qkv, cos, sin, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), k.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2),
            HEADS=num_heads, KV_HEADS=num_kv_heads, ROT_HEADS_PAD=triton.next_power_of_2(num_heads + num_kv_heads),
            KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2,
            HALF_PAD=triton.next_power_of_2(head_dim // 2), BLOCK_SIZE=block_size, PDL=(on := pdl.enabled(qkv)),
            num_warps=4, **pdl.launch_options(on),
        )
    return q, k
