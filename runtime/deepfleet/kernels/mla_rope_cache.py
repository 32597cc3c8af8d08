"""MLA's per-token glue between the projections and attention in one Triton launch (DeepSeek-V3, absorbed form):

- the absorbed query: q_nope · W_UK per head -> query[..., :kv_lora] (W_UK: kv_b_proj's key rows, [H, nope, kv_lora]),
- RoPE of the query's rope part -> query[..., kv_lora:],
- RMSNorm of the new compressed latent (kv_a_layernorm), RoPE of the new rope key, both stored into the token's slot
  of the latent cache ([latent | rope key], one "head").

Rotation follows models/layers.py `_rotate`: pairs (x0, x1), (x2, x3)… when `interleaved` (DeepSeek), else the two
halves, and the result de-interleaved ([x1 cos - x2 sin | x2 cos + x1 sin]) in both; float32 inside, rounded once.
The norm rounds the normalised row to the dtype before the weight, as `_rms_norm_ref` and kernels/rms_norm.py do.

Grid (H + 1, kv_lora / BC, token tiles): program (h, c, tile) multiplies its tile's query rows of head h by
columns c·BC… of W_UK (one tl.dot); (h, 0, tile) also rotates head h's rope part; (H, 0, tile) normalises the
tile's latents and writes their cache rows. That replaces ~24 launches per layer
at batch 1 (the norm, ~16 element-wise rope ops and their cat, the absorb einsum, the query and key cats, the cache
index_copy; H200 profile, bench/RESULTS.md 2026-12-02). FP8 caches keep the unfused path (see kernels/rope_cache.py
on the in-kernel e4m3 write)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Steps of at most this many tokens take this kernel (models/deepseek_v3.py), in one tile of tokens per head: each
# tile reads W_UK (V3: 16.8 MB per layer) again, so a long prefill keeps the einsum.
MAX_TOKENS = 64


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def fits(nope: int, rope: int, kv_lora: int) -> bool:
    """Widths this kernel takes (power-of-two tiles): V3's 128 / 64 / 512 do."""
    return _pow2(nope) and _pow2(kv_lora) and rope > 0 and rope % 2 == 0


@triton.jit
def _rotate_store(src, cos_row, sin_row, dst, mask_t, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """src/dst: [rows, 1] pointers to a rope part; cos_row/sin_row: [rows, 1] pointers to the cos/sin rows."""
    d = tl.arange(0, HALF_PAD)[None, :]
    ok = mask_t & (d < HALF)
    if INTERLEAVED:
        x1 = tl.load(src + 2 * d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + 2 * d + 1, mask=ok, other=0.0).to(tl.float32)
    else:
        x1 = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + d + HALF, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_row + d, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(sin_row + d, mask=ok, other=0.0).to(tl.float32)
    dtype = dst.dtype.element_ty
    tl.store(dst + d, (x1 * c - x2 * s).to(dtype), mask=ok)
    tl.store(dst + HALF + d, (x2 * c + x1 * s).to(dtype), mask=ok)


@triton.jit
def _mla_rope_cache_kernel(query, q, w_uk, kv, norm_w, cos, sin, cache, slot_mapping, num_tokens, eps,
                           stride_qt, stride_qh, stride_ot, stride_oh, stride_wh, stride_wn, stride_kvt,
                           stride_cos, stride_sin, stride_cb, stride_cs,
                           HEADS: tl.constexpr, NOPE: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                           LORA: tl.constexpr, BLOCK_SIZE: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr,
                           INTERLEAVED: tl.constexpr, PRECISION: tl.constexpr):
    h, c, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dtype = query.dtype.element_ty
    offs_t = (tile * BT + tl.arange(0, BT)).to(tl.int64)
    mask_t = (offs_t < num_tokens)[:, None]
    if h < HEADS:
        offs_n = tl.arange(0, NOPE)
        offs_c = c * BC + tl.arange(0, BC)
        w = tl.load(w_uk + h * stride_wh + offs_n[:, None] * stride_wn + offs_c[None, :])
        q_rows = q + offs_t[:, None] * stride_qt + h * stride_qh
        a = tl.load(q_rows + offs_n[None, :], mask=mask_t, other=0.0)
        out_rows = query + offs_t[:, None] * stride_ot + h * stride_oh
        tl.store(out_rows + offs_c[None, :], tl.dot(a, w, input_precision=PRECISION).to(dtype), mask=mask_t)
        if c == 0:
            _rotate_store(q_rows + NOPE, cos + offs_t[:, None] * stride_cos, sin + offs_t[:, None] * stride_sin,
                          out_rows + LORA, mask_t, HALF, HALF_PAD, INTERLEAVED)
    elif c == 0:  # the step's latents: RMSNorm, rope key, cache rows
        cols = tl.arange(0, LORA)[None, :]
        lat = tl.load(kv + offs_t[:, None] * stride_kvt + cols, mask=mask_t, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(lat * lat, 1) / LORA + eps)
        normed = (lat * rstd[:, None]).to(dtype).to(tl.float32) * tl.load(norm_w + cols).to(tl.float32)
        slot = tl.load(slot_mapping + offs_t, mask=offs_t < num_tokens, other=0)
        rows = cache + ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs)[:, None]
        tl.store(rows + cols, normed.to(cache.dtype.element_ty), mask=mask_t)
        _rotate_store(kv + offs_t[:, None] * stride_kvt + LORA, cos + offs_t[:, None] * stride_cos,
                      sin + offs_t[:, None] * stride_sin, rows + LORA, mask_t, HALF, HALF_PAD, INTERLEAVED)


def mla_rope_cache(q: torch.Tensor, w_uk: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    """q [T, H, nope + rope] (q_b_proj's output), w_uk [H, nope, kv_lora], kv [T, kv_lora + rope] (kv_a's output),
    cos/sin [T, 1, rope / 2] (RotaryEmbedding.lookup), cache [blocks, block_size, 1, kv_lora + rope] (not FP8)
    -> the absorbed query [T, H, kv_lora + rope]; the step's latents and rope keys are in the cache."""
    t, heads, qk = q.shape
    nope, kv_lora = w_uk.shape[1], w_uk.shape[2]
    rope = qk - nope
    if q.stride(2) != 1 or w_uk.stride(2) != 1 or kv.stride(1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("mla_rope_cache: the last dimension of every input must be contiguous")
    if not fits(nope, rope, kv_lora) or cache.shape[-1] != kv_lora + rope or cache.shape[2] != 1:
        raise ValueError(f"mla_rope_cache: widths nope {nope}, rope {rope}, kv_lora {kv_lora}, cache "
                         f"{tuple(cache.shape)} not supported")
    query = torch.empty(t, heads, kv_lora + rope, dtype=q.dtype, device=q.device)
    bc = min(128, kv_lora)
    half = rope // 2
    bt = max(16, triton.next_power_of_2(min(t, MAX_TOKENS)))
    _mla_rope_cache_kernel[(heads + 1, kv_lora // bc, triton.cdiv(t, bt))](
        query, q, w_uk, kv, norm_weight, cos, sin, cache, slot_mapping, t, eps,
        q.stride(0), q.stride(1), query.stride(0), query.stride(1), w_uk.stride(0), w_uk.stride(1), kv.stride(0),
        cos.stride(0), sin.stride(0), cache.stride(0), cache.stride(1),
        HEADS=heads, NOPE=nope, HALF=half, HALF_PAD=max(16, triton.next_power_of_2(half)), LORA=kv_lora,
        BLOCK_SIZE=cache.shape[1], BC=bc, BT=bt, INTERLEAVED=interleaved,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return query
