"""Batched LoRA for a step that mixes adapters: y[t] += B[s] · (A[s] · x[t]) with s = the adapter slot of token t.

Written from the design Punica and vLLM describe (BGMV: each token gathers its own adapter's matrices; no code
copied). Two kernels: *shrink* h[t] = A[s] x[t] (all shards' ranks at once, fp32 accumulation and fp32 h: a half
intermediate loses accuracy, as Punica's authors note) and *expand* y[t, n] += B[s][n] · h[t, shard(n)]. A fused
projection (q/k/v, gate/up) keeps each shard's A stacked ([shards·rank, in]) and one B of [out, rank]: the output
column's shard picks its slice of h, so no block-diagonal zeros are stored or multiplied.

Slot `null` (the last) means "no adapter": those tokens are skipped. Shapes depend only on the token count and the
fixed slot tables, and the slots are read from a device tensor, so a CUDA graph captures the kernels once and
replays them for any mix of adapters. Per-token gathering is the decode case's best shape; long prefills re-read
an adapter's A per token (an SGMV kernel grouping tokens by adapter would read it once per segment: not built)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, h_ptr, K: tl.constexpr, NR, null_slot, stride_xt, stride_as, stride_ar,
                   stride_ht, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    s = tl.load(idx_ptr + t)
    if s != null_slot:
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + t * stride_xt + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + s * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                         mask=(offs_r[:, None] < NR) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(h_ptr + t * stride_ht + offs_r, acc, mask=offs_r < NR)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, idx_ptr, y_ptr, N, R, null_slot, off1, off2, stride_ht, stride_bs, stride_bn,
                   stride_yt, NUM_SHARDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    s = tl.load(idx_ptr + t)
    if s != null_slot:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        mask_n = offs_n < N
        shard = tl.zeros([BLOCK_N], dtype=tl.int32)
        if NUM_SHARDS > 1:
            shard += (offs_n >= off1).to(tl.int32)
        if NUM_SHARDS > 2:
            shard += (offs_n >= off2).to(tl.int32)
        mask = mask_n[:, None] & (offs_r[None, :] < R)
        hv = tl.load(h_ptr + t * stride_ht + shard[:, None] * R + offs_r[None, :], mask=mask, other=0.0)
        bv = tl.load(b_ptr + s * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        delta = tl.sum(hv * bv, axis=1)
        yv = tl.load(y_ptr + t * stride_yt + offs_n, mask=mask_n, other=0.0)
        tl.store(y_ptr + t * stride_yt + offs_n, (yv.to(tl.float32) + delta).to(yv.dtype), mask=mask_n)


def lora_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
             shard_offsets: list[int]) -> torch.Tensor:
    """In place on y [T, out]: x [T, in], a [slots, shards·R, in], b [slots, out, R], slots [T] (int64; the last
    slot is "no adapter"), shard_offsets: each shard's first output column (1 to 3 shards)."""
    t, k = x.shape
    n, r = b.shape[1], b.shape[2]
    nr = a.shape[1]
    if t == 0:
        return y
    assert x.stride(1) == 1 and y.stride(1) == 1 and a.is_contiguous() and b.is_contiguous()
    null = a.shape[0] - 1
    h = torch.empty(t, nr, dtype=torch.float32, device=x.device)
    block_r = min(64, triton.next_power_of_2(nr))
    _shrink_kernel[(t, triton.cdiv(nr, block_r))](x, a, slots, h, k, nr, null, x.stride(0), a.stride(0),
                                                 a.stride(1), h.stride(0), BLOCK_R=block_r, BLOCK_K=128)
    offs = [*shard_offsets[1:], n, n][:2]
    block_n = 64
    _expand_kernel[(t, triton.cdiv(n, block_n))](h, b, slots, y, n, r, null, offs[0], offs[1], h.stride(0),
                                                b.stride(0), b.stride(1), y.stride(0), NUM_SHARDS=len(shard_offsets),
                                                BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(r))
    return y
