"""MLA decode in the absorbed form over the paged compressed-latent cache (DeepSeek-V3/R1).

Per token the cache holds one 576-wide row: the normalised latent (kv_lora_rank 512) and the rotated rope key (64),
shared by every head. A decode query per head is [q_nope·W_UK (512) | q_rope (64)]; its scores are
q_lat·latent + q_rope·k_rope and its output is softmax · latent (512 wide; W_UV is applied after, by the model).

Why a kernel of its own next to the generic paged kernel (deepfleet.kernels.paged_attention, which serves MLA too,
in tiles of 16 heads): all 128 heads read the same latent rows, so the cost is the latent reads per head tile.
Here a program owns BLOCK_H = 64 heads of one sequence (the value accumulator is [64, 512] float32, the largest
that stays in registers with 8 warps), so the 576-wide rows are read twice per 128 heads instead of eight times;
score and value products are two tensor-core dots per KV tile (512 + 64, no padding of 576 to 1024).
Split KV (flash-decoding) when batch × head tiles leave SMs idle: the split count comes from the launch shape, each
split covers an even share of the sequence's own length (read on the device) within a compile-time bound, so
the launch is CUDA-graph capturable; partial results merge by their log-sum-exp in plain tensor ops.
Loop trip counts are compile-time (one compilation per block-table width, which the runner buckets to powers of
two). Reference: softmax attention over the gathered latent rows (tests/unit/kernels/test_kernels_mla_decode.py).

Routed (models/deepseek_v3.py, MLA_DECODE_MIN_BATCH) where the H200 measured it faster than the generic kernel:
decode steps of many sequences. At small batches the generic kernel wins (its 16-head tiles give 8x the programs,
and its split merge is one kernel, where this one's merge is several tensor ops)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SPLITS = 32


@triton.jit
def _mla_decode_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr, num_heads, sm_scale,
                       stride_qt, stride_qh, stride_cb, stride_cs, stride_tb, stride_os, stride_ot, stride_oh,
                       stride_ls, stride_lt,
                       BLOCK_SIZE: tl.constexpr, D_LAT: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       PRECISION: tl.constexpr):
    seq, head_tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(lens_ptr + seq)
    heads = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_heads
    d_lat, d_rope = tl.arange(0, D_LAT), tl.arange(0, D_ROPE)
    q_row = q_ptr + seq * stride_qt + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + d_lat[None, :], mask=head_mask[:, None], other=0.0)
    q_rope = tl.load(q_row + D_LAT + d_rope[None, :], mask=head_mask[:, None], other=0.0)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, D_LAT), dtype=tl.float32)
    # this split's even share of the sequence's own tiles (not of the table's width: a graph captured for the
    # longest context still spreads a short one over every split); TILES_PER_SPLIT bounds the share
    per_split = ((ctx + BLOCK_N - 1) // BLOCK_N + NUM_SPLITS - 1) // NUM_SPLITS
    first = split * per_split * BLOCK_N
    for i in range(0, TILES_PER_SPLIT):
        start = first + i * BLOCK_N
        if (i < per_split) & (start < ctx):
            pos = start + tl.arange(0, BLOCK_N)
            valid = pos < ctx
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
            row = cache_ptr + block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cs
            k_lat = tl.load(row[:, None] + d_lat[None, :], mask=valid[:, None], other=0.0)
            k_rope = tl.load(row[:, None] + D_LAT + d_rope[None, :], mask=valid[:, None], other=0.0)
            scores = (tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION)
                      + tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION))
            scores = tl.where(valid[None, :], scores * sm_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=PRECISION)
            m = m_new
    # an empty split (sequence shorter than its range) stores lse -inf: weight 0 in the merge
    safe = tl.where(denom > 0, denom, 1.0)
    out = out_ptr + split * stride_os + seq * stride_ot + heads[:, None] * stride_oh + d_lat[None, :]
    tl.store(out, acc / safe[:, None], mask=head_mask[:, None])
    lse = tl.where(denom > 0, m + tl.log(safe), float("-inf"))
    tl.store(lse_ptr + split * stride_ls + seq * stride_lt + heads, lse, mask=head_mask)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def fits(kv_lora_rank: int, rope_dim: int) -> bool:
    """Whether the kernel runs these widths (powers of two >= 16, as tl.dot and tl.arange need)."""
    return all(d >= 16 and not d & (d - 1) for d in (kv_lora_rank, rope_dim))


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
               scale: float, kv_lora_rank: int) -> torch.Tensor:
    """q [B, H, kv_lora_rank + rope] (absorbed queries, one per decoding sequence); cache [num_blocks, block_size,
    1, kv_lora_rank + rope]; block_tables [B, W] int32; context_lens [B] int32 (tokens in the cache, the new one
    included) -> [B, H, kv_lora_rank] attention over the latent rows, in q's dtype."""
    b, heads, dim = q.shape
    d_rope = dim - kv_lora_rank
    for name, d in (("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", d_rope)):
        if not fits(d, 16):
            raise ValueError(f"{name}={d}: the MLA decode kernel needs a power of two >= 16")
    if tuple(cache.shape[2:]) != (1, dim):
        raise ValueError(f"cache rows {tuple(cache.shape[2:])} do not match one latent head of width {dim}")
    block_size = cache.shape[1]
    block_h = max(16, min(64, triton.next_power_of_2(heads)))
    block_n = 32
    tiles = triton.cdiv(block_tables.shape[1] * block_size, block_n)
    programs = b * triton.cdiv(heads, block_h)
    splits = max(1, min(MAX_SPLITS, tiles, triton.cdiv(2 * _sm_count(q.device), programs)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    part = torch.empty(splits, b, heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, b, heads, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    _mla_decode_kernel[(b, triton.cdiv(heads, block_h), splits)](
        q, cache, block_tables, context_lens, part, lse, heads, scale,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        BLOCK_SIZE=block_size, D_LAT=kv_lora_rank, D_ROPE=d_rope, BLOCK_H=block_h, BLOCK_N=block_n,
        TILES_PER_SPLIT=tiles_per_split, NUM_SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=8 if block_h == 64 else 4, num_stages=2,
    )
    if splits == 1:
        return part[0].to(q.dtype)
    weights = torch.exp(lse - lse.amax(dim=0, keepdim=True))  # every sequence has >= 1 token: some split is finite
    return ((weights[..., None] * part).sum(0) / weights.sum(0)[..., None]).to(q.dtype)
