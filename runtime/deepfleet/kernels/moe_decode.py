"""One token's mixture of experts (batch-1 decode) in two launches, without the sort by expert: x [1, H], its k
routed experts (ids, weights) and the shared expert -> Σ_k weight · down_k(silu(gate_k x) · up_k x) + shared(x).

1. `_gate_up_kernel`, grid (I / BN, k + 1): program (block, slot) streams the BN gate rows and the BN up rows of
   its slot's expert (slot k: the shared expert, a tensor of its own) in the same K loop, so both halves' loads
   are in flight together, and stores silu(gate)·up for its rows (kernels/gemv.py's epilogue and rounding).
2. `_down_kernel`, grid (H / BN,): program `block` loops over the k + 1 slots, multiplies its BN rows of each
   slot's down weight by that slot's activation and adds them, weighted, in float32 in a fixed order; one store
   of the layer's output: no [k, H] intermediate, no sum launch, no add of the shared expert.
The expert ids are read on the device (no host sync, CUDA-graph safe); a slot routed to another rank's expert
(expert parallelism: id >= the experts held) computes nothing and adds nothing.

Each kernel multiplies one of two ways (a candidate's flag per kernel, chosen at start-up by timing,
models/layers.py choose_gemv):
- FMA (any weight dtype): W8A16 on CUDA cores as kernels/fp8_gemm.py's one-row GEMV, [BN, BK] weight tiles
  widened in registers, the block scale folded into x.
- DOT (block-FP8 weights, BK = the scale block's K): x (or the activation) quantized per 128 features to e4m3 in
  the kernel (fp8_gemm.quantize_activations' rounding), put in row 0 of a 16-row tile, and FP8 tensor-core dots
  with the [BK, BN] weight tile, scaled by (x group scale) × (weight block scale) per K step: no widening of the
  weight in registers, which on the H200 streams big weights faster than the FMA form (bench/RESULTS.md).
vLLM and SGLang reach this shape by sorting one token's 8 assignments into 8 padded tiles (as fused_moe.py does);
AMD's aiter has a batch-1 kernel reading topk_ids directly and folds the shared expert in as a 9th expert; the
code here is written independently."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepfleet.kernels import pdl
from deepfleet.kernels.fp8_gemm import _round_to_e4m3
from deepfleet.kernels.gemv import store_rows

FP8 = torch.float8_e4m3fn
# (gate_up DOT, gate_up BN, gate_up BK, down DOT, down BN, down BK, num_warps), timed at start-up against
# fused_moe's grouped path: vLLM's 64-wide N tiles for block FP8 at low batch, narrower ones for more programs, and
# the dense one-row GEMV's fastest 7B tiles (BN 8 / 4, BK 512) for the FMA form
CANDIDATE_TILES = [
    (True, 16, 128, False, 4, 512, 4),
    (True, 32, 128, False, 8, 512, 4),
    (True, 64, 128, False, 4, 512, 4),
    (True, 16, 128, True, 16, 128, 4),
    (False, 8, 512, False, 8, 512, 4),
    (False, 4, 512, False, 4, 512, 4),
]


@triton.jit
def _quantized_row(xv):
    """xv [BK] float32 (one scale group) -> ([16, BK] e4m3 with xv quantized in row 0, zeros below; its scale)."""
    scale = tl.maximum(tl.max(tl.abs(xv), 0), 1e-10) / 448.0
    q = _round_to_e4m3(tl.clamp(xv / scale, -448.0, 448.0))
    rows = tl.arange(0, 16)
    return tl.where(rows[:, None] == 0, q[None, :], 0.0).to(tl.float8e4nv), scale


@triton.jit
def _row0(acc):
    return tl.sum(tl.where(tl.arange(0, 16)[:, None] == 0, acc, 0.0), 0)


@triton.jit
def _fma_step(acc, rows, scale_row, xv, k, k_ok, FP8_W: tl.constexpr, BLOCK_WK: tl.constexpr):
    """acc [BN, BK] += the weight rows' K tile (pointers `rows` [BN]) times xv, the block scales folded into xv."""
    if FP8_W:
        xv = xv * tl.load(scale_row + k // BLOCK_WK, mask=k_ok, other=0.0)
    return acc + tl.load(rows[:, None] + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32) * xv[None, :]


@triton.jit
def _dot_step(acc, rows, scale_row, a, a_scale, k, t):
    """acc [16, BN] += a [16, BK] e4m3 · the weight rows' K tile (one block scale: BK is the scale block)."""
    w = tl.load(rows[None, :] + k[:, None])
    return acc + tl.dot(a, w) * (a_scale * tl.load(scale_row + t))


@triton.jit
def _gate_up_kernel(act_ptr, x_ptr, ids_ptr, w_ptr, ws_ptr, shared_w_ptr, shared_ws_ptr, held, INNER,
                    K: tl.constexpr, stride_we, stride_wse, stride_wn, stride_wsn, TOP_K: tl.constexpr,
                    FP8_W: tl.constexpr, DOT: tl.constexpr, BLOCK_WN: tl.constexpr, BLOCK_WK: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    block, slot = tl.program_id(0), tl.program_id(1)
    pdl.enter(PDL)  # the ids (and so which weights) come from the routing kernel
    if (slot < TOP_K) & (tl.load(ids_ptr + tl.minimum(slot, TOP_K - 1)) >= held):
        return  # another rank's expert: its activation is never read
    if slot < TOP_K:
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        w_base = w_ptr + expert * stride_we
        s_base = ws_ptr + expert * stride_wse
    else:
        w_base = shared_w_ptr
        s_base = shared_ws_ptr
    n = block * BN + tl.arange(0, BN)  # (INNER is a multiple of BN: no row mask)
    gate_rows = w_base + n.to(tl.int64) * stride_wn
    up_rows = gate_rows + INNER.to(tl.int64) * stride_wn
    # BN divides the scale block's rows: one row of block scales per half
    gate_scales = s_base + ((block * BN) // BLOCK_WN) * stride_wsn
    up_scales = s_base + ((INNER + block * BN) // BLOCK_WN) * stride_wsn
    if DOT:
        acc_gate = tl.zeros([16, BN], tl.float32)
        acc_up = tl.zeros([16, BN], tl.float32)
        for t in range(0, K // BK):
            k = t * BK + tl.arange(0, BK)
            a, a_scale = _quantized_row(tl.load(x_ptr + k).to(tl.float32))
            acc_gate = _dot_step(acc_gate, gate_rows, gate_scales, a, a_scale, k, t)
            acc_up = _dot_step(acc_up, up_rows, up_scales, a, a_scale, k, t)
        gate, up = _row0(acc_gate), _row0(acc_up)
    else:
        acc_gate = tl.zeros([BN, BK], tl.float32)
        acc_up = tl.zeros([BN, BK], tl.float32)
        for t in range(0, (K + BK - 1) // BK):
            k = t * BK + tl.arange(0, BK)
            k_ok = k < K
            xv = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            acc_gate = _fma_step(acc_gate, gate_rows, gate_scales, xv, k, k_ok, FP8_W, BLOCK_WK)
            acc_up = _fma_step(acc_up, up_rows, up_scales, xv, k, k_ok, FP8_W, BLOCK_WK)
        gate, up = tl.sum(acc_gate, 1), tl.sum(acc_up, 1)
    store_rows(act_ptr + slot * INNER, gate, up, n, n < INNER, INNER, x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, 0.0,
               HAS_BIAS=False, SILU_MUL=True, ADD_NORM=False, BLOCK_ROW=1)


@triton.jit
def _down_kernel(out_ptr, act_ptr, ids_ptr, route_w_ptr, w_ptr, ws_ptr, shared_w_ptr, shared_ws_ptr, held, H,
                 INNER: tl.constexpr, stride_we, stride_wse, stride_wn, stride_wsn, TOP_K: tl.constexpr,
                 SLOTS: tl.constexpr, FP8_W: tl.constexpr, DOT: tl.constexpr, BLOCK_WN: tl.constexpr,
                 BLOCK_WK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    block = tl.program_id(0)
    n = block * BN + tl.arange(0, BN)
    n_ok = n < H
    row_offs = tl.minimum(n, H - 1).to(tl.int64) * stride_wn  # rows past H read row H-1; never stored
    scale_offs = ((block * BN) // BLOCK_WN) * stride_wsn
    pdl.enter(PDL)
    total = tl.zeros([BN], tl.float32)
    for slot in tl.static_range(SLOTS):  # fixed order: the same sum on every run
        if slot < TOP_K:
            expert = tl.load(ids_ptr + slot).to(tl.int64)
            live = expert < held
            expert = tl.minimum(expert, held - 1)  # (a remote slot: in-bounds reads, its sum thrown away)
            weight = tl.load(route_w_ptr + slot)
            rows = w_ptr + expert * stride_we + row_offs
            scales = ws_ptr + expert * stride_wse + scale_offs
        else:
            live = True
            weight = 1.0
            rows = shared_w_ptr + row_offs
            scales = shared_ws_ptr + scale_offs
        act = act_ptr + slot * INNER
        if DOT:
            acc = tl.zeros([16, BN], tl.float32)
            for t in range(0, INNER // BK):
                k = t * BK + tl.arange(0, BK)
                a, a_scale = _quantized_row(tl.load(act + k).to(tl.float32))
                acc = _dot_step(acc, rows, scales, a, a_scale, k, t)
            part = _row0(acc)
        else:
            acc = tl.zeros([BN, BK], tl.float32)
            for t in range(0, (INNER + BK - 1) // BK):
                k = t * BK + tl.arange(0, BK)
                k_ok = k < INNER
                xv = tl.load(act + k, mask=k_ok, other=0.0).to(tl.float32)
                acc = _fma_step(acc, rows, scales, xv, k, k_ok, FP8_W, BLOCK_WK)
            part = tl.sum(acc, 1)
        total += tl.where(live, part * weight, 0.0)  # (where, not a product: a remote slot's act is unwritten)
    tl.store(out_ptr + n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


def fits(tiles: tuple, w13: torch.Tensor, w2: torch.Tensor, block: tuple[int, int] | None) -> bool:
    """Whether `tiles` can run these expert stacks (w13 [E, 2I, H], w2 [E, H, I]; block: FP8 scale blocks)."""
    gu_dot, gu_bn, gu_bk, d_dot, d_bn, d_bk, _ = tiles
    inner, hidden = w2.shape[2], w2.shape[1]
    fp8_w = w13.dtype == FP8
    if inner % gu_bn or (fp8_w and (block[0] % gu_bn or block[0] % d_bn or inner % block[0])):
        return False
    for dot, bn, bk, k in ((gu_dot, gu_bn, gu_bk, hidden), (d_dot, d_bn, d_bk, inner)):
        if dot and not (fp8_w and bk == block[1] and k % bk == 0 and bn >= 16):
            return False
    return True


def moe_decode(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor | None, w2: torch.Tensor,
               w2_scale: torch.Tensor | None, ids: torch.Tensor, weights: torch.Tensor,
               block: tuple[int, int] | None, tiles: tuple, shared: tuple | None = None) -> torch.Tensor:
    """x [1, H]; w13 [E, 2I, H] (gate | up), w2 [E, H, I] (compute dtype, or FP8 with [E, ., .] block scales);
    ids [1, k] (an id >= E: another rank's expert, skipped), weights [1, k] float32; `shared`: (gate_up [2I, H],
    its scales, down [H, I], its scales) of one shared expert with the routed experts' shapes (scales None
    unquantized), added with weight 1 -> [1, H] in x's dtype. `tiles`: one of CANDIDATE_TILES that `fits`."""
    held, two_i, hidden = w13.shape
    inner = two_i // 2
    top_k = ids.shape[1]
    fp8_w = w13.dtype == FP8
    if x.shape != (1, hidden) or ids.shape != (1, top_k) or weights.shape != (1, top_k) \
            or w2.shape != (held, hidden, inner) or not fits(tiles, w13, w2, block):
        raise ValueError(f"moe_decode: x {tuple(x.shape)}, ids {tuple(ids.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)} and tiles {tiles} do not fit")
    if shared is not None and (shared[0].shape != w13.shape[1:] or shared[2].shape != w2.shape[1:]
                               or shared[0].dtype != w13.dtype):
        raise ValueError("moe_decode: the shared expert's weights must have the routed experts' shapes and dtype")
    gu_dot, gu_bn, gu_bk, d_dot, d_bn, d_bk, warps = tiles
    x = x.contiguous()
    ids = ids.contiguous()
    weights = weights.to(torch.float32).contiguous()
    w13_scale = w13_scale if fp8_w else w13  # (unused without FP8)
    w2_scale = w2_scale if fp8_w else w2
    sw13, ss13, sw2, ss2 = shared if shared is not None else (w13[0], w13_scale[0], w2[0], w2_scale[0])
    ss13, ss2 = (ss13, ss2) if fp8_w else (sw13, sw2)
    for expert_w, shared_w in ((w13[0], sw13), (w2[0], sw2), (w13_scale[0], ss13), (w2_scale[0], ss2)):
        if expert_w.stride() != shared_w.stride():
            raise ValueError("moe_decode: the shared expert's rows must be laid out as an expert's")
    slots = top_k + (shared is not None)
    act = x.new_empty(slots, inner)
    out = x.new_empty(1, hidden)
    blocks_wn, blocks_wk = block if fp8_w else (1, 1)
    on = pdl.enabled(x)
    _gate_up_kernel[(inner // gu_bn, slots)](
        act, x, ids, w13, w13_scale, sw13, ss13, held, inner, hidden, w13.stride(0),
        w13_scale.stride(0) if fp8_w else 0, w13.stride(1), w13_scale.stride(1) if fp8_w else 0,
        TOP_K=top_k, FP8_W=fp8_w, DOT=gu_dot, BLOCK_WN=blocks_wn, BLOCK_WK=blocks_wk, BN=gu_bn, BK=gu_bk, PDL=on,
        num_warps=warps, **pdl.launch_options(on))
    _down_kernel[(triton.cdiv(hidden, d_bn),)](
        out, act, ids, weights, w2, w2_scale, sw2, ss2, held, hidden, inner, w2.stride(0),
        w2_scale.stride(0) if fp8_w else 0, w2.stride(1), w2_scale.stride(1) if fp8_w else 0,
        TOP_K=top_k, SLOTS=slots, FP8_W=fp8_w, DOT=d_dot, BLOCK_WN=blocks_wn, BLOCK_WK=blocks_wk, BN=d_bn,
        BK=d_bk, PDL=on, num_warps=warps, **pdl.launch_options(on))
    return out
