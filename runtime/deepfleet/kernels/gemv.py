"""Batch-1 matrix-vector products in Triton, split over K with the reduction in the same launch, optionally with
the gated MLP's SiLU·mul fused into the epilogue.

`gemv(x, w, bias)` = x wᵀ + b for one row x [1, K], w [N, K] (row-major, as nn.Linear stores it). With
`silu_mul=True`, w is the fused [gate; up] matrix [2N, K] and the result is silu(x gateᵀ) * (x upᵀ) [1, N]: the
gate_up output never goes to memory and the activation is not a launch of its own. Rounding is the unfused
path's: each product is accumulated in float32 and rounded to the activation dtype (as the GEMM's output is),
SiLU·mul in float32 on those rounded values, rounded once.

`gemv_add_norm(x, w, bias, residual, norm_weight, eps)` = (rmsnorm(y + residual) * norm_weight, y + residual) with
y = x wᵀ + b: the residual add and RMSNorm that follow the O projection (and the down projection: the next layer's
input norm), in the same launch. Each program adds the residual to its rows and stores the sum; the last program
of the launch to arrive (a second arrival counter, over all row blocks, as batch 1 is one row) reads the whole
summed row back and normalises it. The rounding points are kernels/rms_norm.py's fused residual+RMSNorm: y rounded
to the dtype, the sum rounded to the dtype, float32 statistics over it, the normalised row rounded, times the
weight, rounded. It saves that kernel's launch.

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

from deepfleet.kernels import pdl, workspace

# (BLOCK_N, BLOCK_K, num_warps, SPLIT_K) used when no tiles are given (tests, shapes nobody timed)
DEFAULT_TILES = (4, 512, 4, 1)
# timed at start-up for each weight shape: the fastest of bench/gemv_sweep.py's grid for some projection of the
# 1.5B/7B shapes on the H200 (2026-12-02, bench/RESULTS.md), plus (2, 2048, 8, 1), the earlier kernel's pick for
# the 1.5B O projection (outside that grid)
CANDIDATE_TILES = [DEFAULT_TILES, (2, 1024, 4, 1), (2, 1024, 8, 1), (2, 1024, 4, 2), (2, 2048, 8, 1),
                   (16, 128, 8, 1), (16, 128, 8, 4)]


@triton.jit
def store_rows(y, out, up, n, n_ok, N, bias, res, norm_w, norm_out, norm_counter, eps, HAS_BIAS: tl.constexpr,
               SILU_MUL: tl.constexpr, ADD_NORM: tl.constexpr, BLOCK_ROW: tl.constexpr):
    """A one-row GEMV's epilogue for its rows n once their float32 sums are whole (`out`; `up`: the up rows' with
    SILU_MUL, the gate rows' being out): bias, rounding to y's dtype, SiLU·mul, the residual add, the store, and
    with ADD_NORM the RMSNorm of the whole row by the last program of the launch to arrive. Shared with
    kernels/fp8_gemm.py's one-row GEMV, so both round where the unfused launches do (module docstring)."""
    dtype = y.dtype.element_ty
    if HAS_BIAS:
        out += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    out = out.to(dtype)
    if SILU_MUL:  # (not with split K: the gate and up sums of a row are both in this program)
        if HAS_BIAS:
            up += tl.load(bias + N + n, mask=n_ok, other=0.0).to(tl.float32)
        gate = out.to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up.to(dtype).to(tl.float32)).to(dtype)
    if ADD_NORM:  # y holds y + residual (the new residual stream), not the product itself
        out = (out.to(tl.float32) + tl.load(res + n, mask=n_ok, other=0.0).to(tl.float32)).to(dtype)
    tl.store(y + n, out, mask=n_ok)
    if ADD_NORM:
        # the same release/acquire as the split-K arrival, over the row blocks that stored their sums
        tl.debug_barrier()
        if tl.atomic_add(norm_counter, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            cols = tl.arange(0, BLOCK_ROW)
            cols_ok = cols < N
            v = tl.load(y + cols, mask=cols_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(v * v, 0) / N + eps)
            normed = (v * rstd).to(dtype).to(tl.float32)
            scale = tl.load(norm_w + cols, mask=cols_ok, other=0.0).to(tl.float32)
            tl.store(norm_out + cols, (normed * scale).to(dtype), mask=cols_ok)
            tl.store(norm_counter, 0)  # ready for the next launch


@triton.jit
def _gemv_kernel(y, x, w, bias, partial, counter, N, K, stride_wn, k_per_split,
                 res, norm_w, norm_out, norm_counter, eps,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU_MUL: tl.constexpr, ADD_NORM: tl.constexpr, BLOCK_ROW: tl.constexpr, PDL: tl.constexpr):
    block = tl.program_id(0)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    # rows past N read row N-1 (in bounds, unmasked loads); their sums are never stored
    rows_w = w + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn
    rows_up = rows_w + N.to(tl.int64) * stride_wn  # (SILU_MUL: the up rows follow the gate rows)
    k_begin = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    # The first K tile of the weights is loaded before waiting for the previous kernel (kernels/pdl.py; weights
    # are no kernel's output): under PDL its HBM latency overlaps that kernel's tail (all of K where one tile
    # covers it). x, the partials and the counters are touched only after the wait.
    k = k_begin + tl.arange(0, BLOCK_K)
    k_ok = k < k_end
    acc = tl.load(rows_w + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if SILU_MUL:
        acc_up = tl.load(rows_up + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
    pdl.enter(PDL)
    xv = tl.load(x + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    acc *= xv
    if SILU_MUL:
        acc_up *= xv
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):
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
    store_rows(y, out, tl.sum(acc_up, 1), n, n_ok, N, bias, res, norm_w, norm_out, norm_counter, eps,
               HAS_BIAS, SILU_MUL, ADD_NORM, BLOCK_ROW)


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> None:
    if x.dim() != 2 or x.shape[0] != 1 or w.dim() != 2 or w.shape[1] != x.shape[1] or x.stride(1) != 1 \
            or w.stride(1) != 1 or (silu_mul and w.shape[0] % 2):
        raise ValueError(f"gemv: x {tuple(x.shape)} (one row) and w {tuple(w.shape)} do not fit")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} does not match w {tuple(w.shape)}")


def _launch(y, x, w, bias, silu_mul, tiles, norm=None) -> None:
    """y [1, N] = the product (with `norm` = (residual, norm weight, normed out, eps): y + residual, normed out)."""
    block_n, block_k, warps, split_k = tiles or DEFAULT_TILES
    k = x.shape[1]
    n = y.shape[1]
    if silu_mul and split_k > 1:
        raise ValueError("gemv: the fused SiLU·mul epilogue needs the whole of K in one program (SPLIT_K 1)")
    # slices of whole tiles; a split past K's end would have no work, so fewer splits where K is short
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    blocks = triton.cdiv(n, block_n)
    partial, counter, (res, norm_w, norm_out, eps), norm_counter = one_row_workspace(y, blocks, split_k, norm, "gemv")
    _gemv_kernel[(blocks, split_k)](
        y, x, w, w if bias is None else bias, partial, counter, n, k, w.stride(0), k_per_split,
        res, norm_w, norm_out, norm_counter, eps,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        ADD_NORM=norm is not None, BLOCK_ROW=triton.next_power_of_2(n) if norm else 1, PDL=(on := pdl.enabled(x)),
        num_warps=warps, **pdl.launch_options(on),
    )


def one_row_workspace(y: torch.Tensor, blocks: int, split: int, norm: tuple | None, name: str) -> tuple:
    """(partials, arrival counters, norm = (residual, norm weight, normed out, eps), norm counter) of a one-row
    launch of `blocks` row blocks over `split` K slices (also the FP8 GEMV's, kernels/fp8_gemm.py): workspaces named
    after `name` only where a split or the add + norm epilogue needs them, y standing in for the unused ones."""
    partial = counter = y
    if split > 1:
        partial = workspace.buffer(y.device, f"{name} partials", split * y.shape[1], torch.float32)
        counter = workspace.buffer(y.device, f"{name} counters", blocks, torch.int32)
    norm_counter = workspace.buffer(y.device, f"{name} norm counter", 1, torch.int32) if norm else y
    return partial, counter, norm or (y, y, y, 0.0), norm_counter


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
         tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [1, K], w [N, K] ([2N, K]: gate then up, with `silu_mul`), bias [N] ([2N]) or None -> [1, N] in x's
    dtype. `tiles`: (BLOCK_N, BLOCK_K, num_warps, SPLIT_K), BLOCK_N and BLOCK_K powers of two; DEFAULT_TILES
    without."""
    _check(x, w, bias, silu_mul)
    y = x.new_empty(1, w.shape[0] // 2 if silu_mul else w.shape[0])
    _launch(y, x, w, bias, silu_mul, tiles)
    return y


def gemv_add_norm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                  norm_weight: torch.Tensor, eps: float, tiles: tuple[int, int, int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, K], w [N, K], bias [N] or None, residual [1, N], norm_weight [N] -> (rmsnorm(y + residual) *
    norm_weight, y + residual), both [1, N] in x's dtype, y = x wᵀ + b: kernels/rms_norm.py's
    `rms_norm(y, norm_weight, eps, residual)` on the product, in the GEMV's launch."""
    _check(x, w, bias, False)
    summed, normed = add_norm_outputs(x, w.shape[0], residual, norm_weight, "gemv_add_norm")
    _launch(summed, x, w, bias, False, tiles, norm=(residual, norm_weight, normed, eps))
    return normed, summed


def add_norm_outputs(x: torch.Tensor, n: int, residual: torch.Tensor, norm_weight: torch.Tensor,
                     caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (summed, normed) [1, n] outputs of a one-row product with the add + norm epilogue, after checking that
    the residual and the norm weight fit the product (also the FP8 GEMV's, kernels/fp8_gemm.py)."""
    if residual.shape != (1, n) or residual.dtype != x.dtype or residual.stride(1) != 1 \
            or norm_weight.shape != (n,):
        raise ValueError(f"{caller}: residual {tuple(residual.shape)} {residual.dtype} and norm weight "
                         f"{tuple(norm_weight.shape)} do not match the product [1, {n}] {x.dtype}")
    return x.new_empty(1, n), x.new_empty(1, n)
