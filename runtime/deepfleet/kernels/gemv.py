"""Batch-1 matrix-vector products in Triton, optionally with the gated MLP's SiLU·mul fused into the epilogue.

`gemv(x, w, bias)` = x wᵀ + b for one row x [1, K], w [N, K] (row-major, as nn.Linear stores it). With
`silu_mul=True`, w is the fused [gate; up] matrix [2N, K] and the result is silu(x gateᵀ) * (x upᵀ) [1, N]: the
gate_up output never goes to memory and the activation is not a launch of its own. Rounding is the unfused path's:
each product is accumulated in float32 and rounded to the activation dtype (as the GEMM's output is), then SiLU·mul
in float32 on those rounded values, rounded once.

Why. At batch 1 a decode step reads every weight once; on the H200 (2026-12-02, 1.5B shape) cuBLAS reached
1.1 TB/s on the 6 MB QKV and O projections and 2.4-3.2 TB/s on the MLP's (device copy rate 4.2 TB/s), and the
activation was a launch of its own. A program here owns BLOCK_N output features and streams their rows of w over
K in BLOCK_K-wide tiles, every tile load 16-byte vectors along K; BLOCK_N is chosen small enough that the launch
has several programs per SM (bytes in flight hide the memory latency) and the float32 products of a tile are
summed over K once, after the loop. Which of this kernel and cuBLAS runs each layer shape is decided at start-up
by timing both on the model's own weights (models/layers.py `choose_gemv`). Batches of two or more rows stay with
cuBLAS, whose small-M tiles share each loaded tile of w between the rows."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 8192  # BLOCK_N x BLOCK_K products per iteration: 32 float32 per thread at 8 warps
_PROGRAMS_PER_SM = 4


@triton.jit
def _gemv_kernel(y, x, w, bias, N, K, up_offset, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows_w = w + n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # reduced over K once, after the loop
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xv = tl.load(x + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        mask = n_ok[:, None] & k_ok[None, :]
        acc += tl.load(rows_w + k[None, :], mask=mask, other=0.0).to(tl.float32) * xv
        if SILU_MUL:
            acc_up += tl.load(rows_w + up_offset * stride_wn + k[None, :], mask=mask, other=0.0).to(tl.float32) * xv
    dtype = y.dtype.element_ty
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(bias + n, mask=n_ok, other=0.0).to(tl.float32)
    out = out.to(dtype)
    if SILU_MUL:
        up = tl.sum(acc_up, 1)
        if HAS_BIAS:
            up += tl.load(bias + up_offset + n, mask=n_ok, other=0.0).to(tl.float32)
        gate = out.to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up.to(dtype).to(tl.float32)).to(dtype)
    tl.store(y + n, out, mask=n_ok)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _blocks(n: int, k: int, sms: int) -> tuple[int, int]:
    block_k = min(triton.next_power_of_2(k), _TILE_ELEMENTS)
    block_n = max(1, _TILE_ELEMENTS // block_k)
    while block_n > 1 and triton.cdiv(n, block_n) < _PROGRAMS_PER_SM * sms:
        block_n //= 2
    return block_n, block_k


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
         tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] (contiguous), w [N, K] ([2N, K]: gate then up, with `silu_mul`), bias [N] ([2N]) or None
    -> [1, N] in x's dtype. `tiles`: (BLOCK_N, BLOCK_K, num_warps), powers of two, instead of the choice below
    (bench/gemv_sweep.py times them)."""
    if x.dim() != 2 or x.shape[0] != 1 or w.dim() != 2 or w.shape[1] != x.shape[1] or x.stride(1) != 1 \
            or w.stride(1) != 1 or (silu_mul and w.shape[0] % 2):
        raise ValueError(f"gemv: x {tuple(x.shape)} (one row) and w {tuple(w.shape)} do not fit")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} does not match w {tuple(w.shape)}")
    k = x.shape[1]
    n = w.shape[0] // 2 if silu_mul else w.shape[0]
    y = x.new_empty(1, n)
    sms = _sm_count(x.device.index or 0) if x.is_cuda else 2  # CPU: Triton's interpreter (tests)
    if tiles is None:
        block_n, block_k = _blocks(n, k, sms)
        warps = 8 if block_n * block_k >= 4096 else 4
    else:
        block_n, block_k, warps = tiles
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        y, x, w, w if bias is None else bias, n, k, n, w.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, SILU_MUL=silu_mul, num_warps=warps,
    )
    return y
