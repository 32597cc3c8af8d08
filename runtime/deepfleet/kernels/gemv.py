"""Batch-1 matrix-vector products in Triton, split over K with the reduction in the same launch, optionally with
the gated MLP's SiLU·mul fused into the epilogue.

`gemv(x, w, bias)` = x wᵀ + b for one row x [1, K], w [N, K] (row-major, as nn.Linear stores it). With
`silu_mul=True`, w is the fused [gate; up] matrix [2N, K] and the result is silu(x gateᵀ) * (x upᵀ) [1, N]: the
gate_up output never goes to memory and the activation is not a launch of its own. Rounding is the unfused
path's: each product is accumulated in float32 and rounded to the activation dtype (as the GEMM's output is),
SiLU·mul in float32 on those rounded values, rounded once.

Why. At batch 1 a decode step reads every weight once, so a projection is as fast as its weight streams from HBM
(4.2-4.3 TB/s device copy on the H200). A program owns BLOCK_N output rows and one of SPLIT_K slices of K and
streams those rows in BLOCK_N x BLOCK_K tiles, 16-byte vector loads along K, float32 products summed over K once,
after the loop. Tall K (the down projection, K = 18944 at 7B) can be split so that enough programs are in flight;
each slice's float32 partial goes to a workspace and the program that finishes a row block last (an atomic
arrival counter per row block, kernels/workspace.py) adds them up: no separate reduction launch, as cuBLAS's
split-K GEMMs need. Tiles per weight shape are chosen at start-up by timing (models/layers.py `choose_gemv`)
among CANDIDATE_TILES, against cuBLAS. Batches of two or more rows stay with cuBLAS, whose small-M tiles share
each loaded tile of w."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepfleet.kernels import workspace

# (BLOCK_N, BLOCK_K, num_warps, SPLIT_K) used when no tiles are given (tests, shapes nobody timed)
DEFAULT_TILES = (4, 512, 4, 1)
# timed at start-up for each weight shape: the fastest of bench/gemv_sweep.py's grid for some projection of the
# 1.5B/7B shapes on the H200 (2026-12-02, bench/RESULTS.md), plus (2, 2048, 8, 1), the earlier kernel's pick for
# the 1.5B O projection (outside that grid)
CANDIDATE_TILES = [DEFAULT_TILES, (2, 1024, 4, 1), (2, 1024, 8, 1), (2, 1024, 4, 2), (2, 2048, 8, 1),
                   (16, 128, 8, 1), (16, 128, 8, 4)]


@triton.jit
def _gemv_kernel(y, x, w, bias, partial, counter, N, K, stride_wn, k_per_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU_MUL: tl.constexpr):
    dtype = y.dtype.element_ty
    block = tl.program_id(0)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    # rows past N read row N-1 (in bounds, unmasked loads); their sums are never stored
    rows_w = w + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn
    rows_up = rows_w + N.to(tl.int64) * stride_wn  # (SILU_MUL: the up rows follow the gate rows)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        xv = tl.load(x + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(rows_w + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32) * xv
        if SILU_MUL:
            acc_up += tl.load(rows_up + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32) * xv
    out = tl.sum(acc, 1)
    if SPLIT_K > 1:
        tl.store(partial + tl.program_id(1) * N + n, out, mask=n_ok)
        # every thread's partial stored before the arrival (barrier), which releases them to the last program
        # (acq_rel), whose loads then see the other slices' (.cg: from L2, not a stale L1)
        tl.debug_barrier()
        if tl.atomic_add(counter + block, 1, sem="acq_rel") != SPLIT_K - 1:
            return
        out = tl.zeros([BLOCK_N], tl.float32)
        for s in tl.static_range(SPLIT_K):
            out += tl.load(partial + s * N + n, mask=n_ok, other=0.0, cache_modifier=".cg")
        tl.store(counter + block, 0)  # ready for the next launch (graphs replay the same counters)
    if HAS_BIAS:
        out += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    out = out.to(dtype)
    if SILU_MUL:  # (not with SPLIT_K > 1: gate_up's K is short)
        up = tl.sum(acc_up, 1)
        if HAS_BIAS:
            up += tl.load(bias + N + n, mask=n_ok, other=0.0).to(tl.float32)
        gate = out.to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(y + n, out, mask=n_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
         tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [1, K], w [N, K] ([2N, K]: gate then up, with `silu_mul`), bias [N] ([2N]) or None -> [1, N] in x's
    dtype. `tiles`: (BLOCK_N, BLOCK_K, num_warps, SPLIT_K), BLOCK_N and BLOCK_K powers of two; DEFAULT_TILES
    without."""
    if x.dim() != 2 or x.shape[0] != 1 or w.dim() != 2 or w.shape[1] != x.shape[1] or x.stride(1) != 1 \
            or w.stride(1) != 1 or (silu_mul and w.shape[0] % 2):
        raise ValueError(f"gemv: x {tuple(x.shape)} (one row) and w {tuple(w.shape)} do not fit")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} does not match w {tuple(w.shape)}")
    block_n, block_k, warps, split_k = tiles or DEFAULT_TILES
    k = x.shape[1]
    n = w.shape[0] // 2 if silu_mul else w.shape[0]
    if silu_mul and split_k > 1:
        raise ValueError("gemv: the fused SiLU·mul epilogue needs the whole of K in one program (SPLIT_K 1)")
    # slices of whole tiles; a split past K's end would have no work, so fewer splits where K is short
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    blocks = triton.cdiv(n, block_n)
    y = x.new_empty(1, n)
    partial = counter = y
    if split_k > 1:
        partial = workspace.buffer(x.device, "gemv partials", split_k * n, torch.float32)
        counter = workspace.buffer(x.device, "gemv counters", blocks, torch.int32)
    _gemv_kernel[(blocks, split_k)](
        y, x, w, w if bias is None else bias, partial, counter, n, k, w.stride(0), k_per_split,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        num_warps=warps,
    )
    return y
