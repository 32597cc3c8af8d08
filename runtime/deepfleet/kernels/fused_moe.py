"""Fused mixture-of-experts: every routed expert of a batch in two grouped GEMM launches, without a host sync, so a
decode step with MoE layers can be captured in a CUDA graph.

1. `align_by_expert` (on the device, fixed output sizes; one program of `_align_kernel` for decode-sized batches,
   tensor ops above): the batch's (token, slot) assignments are sorted
   by expert and each expert's run is padded to a multiple of the tile height BM; every BM-row tile then belongs
   to one expert. Sizes are upper bounds known from the shapes alone (A + min(E, A)·(BM-1) rows for A
   assignments), and the number of rows actually used stays on the device: tiles past it return at once.
2. `_moe_gemm_kernel` runs one (tile, N block) per program: it gathers its rows of the input (token = row // top_k
   for the first GEMM), multiplies by that expert's weight ([E, N, K], bf16 or FP8 with block scales) and writes
   rows back in assignment order. gate|up first, SiLU·mul, then down with the routing weight folded in, and a sum
   over each token's top-k rows.
This is the structure of vLLM's and SGLang's Triton fused MoE (sorted token ids, per-tile expert ids, a padded
row count read in the kernel); the code here is written independently. With FP8 weights the kernel either widens
the weight tile to the activation dtype (few rows: the step is bound by reading weights) or quantizes activations
per token and 128-group and uses FP8 tensor cores, as deepfleet.kernels.fp8_gemm does for dense layers.
Reference: the per-expert loop in deepfleet.models.deepseek_v3 (`experts_reference`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deepfleet.kernels.fp8_gemm import STREAMING_MAX_ROWS, quantize_activations

FP8 = torch.float8_e4m3fn


# Decode-sized batches (up to this many (token, slot) assignments: 128 tokens at V3's top-8) are sorted by one
# program of `_align_kernel`, every assignment in its registers; larger ones by `align_reference`'s tensor ops.
ALIGN_KERNEL_MAX = 1024


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int, skip_remote: bool = False):
    """topk_ids [T, k] -> (row ids [cap] (the sentinel T·k marks padding), expert of each BM tile [cap / BM]
    (num_experts or more past the end), rows used [1]), all int32 on the device, sizes known from the shapes.
    `skip_remote` (expert parallelism): the id num_experts marks a slot whose expert is on another rank; those
    slots sort after the last local expert, past the rows used, so no tile computes them. CUDA, at most
    ALIGN_KERNEL_MAX assignments: one Triton kernel (and two fills); otherwise `align_reference`."""
    if topk_ids.is_cuda and topk_ids.numel() <= ALIGN_KERNEL_MAX:
        return align_kernel(topk_ids, num_experts, block_m, skip_remote)
    return align_reference(topk_ids, num_experts, block_m, skip_remote)


def _capacity(n: int, bins: int, block_m: int) -> int:
    """Rows of the sorted layout: n assignments and at most BM - 1 padding rows for each expert that has some."""
    return triton.cdiv(n + min(bins, n) * (block_m - 1), block_m) * block_m


@triton.jit
def _align_kernel(ids_ptr, row_ids_ptr, tile_expert_ptr, rows_used_ptr, n, BINS: tl.constexpr,
                  LOCAL: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    i = tl.arange(0, BLOCK_N)
    expert = tl.load(ids_ptr + i, mask=i < n, other=BINS).to(tl.int32)  # past n: the bin after the last
    counts = tl.histogram(expert, BLOCK_B)
    b = tl.arange(0, BLOCK_B)
    padded = tl.where(b < BINS, (counts + BM - 1) // BM * BM, 0)
    ends = tl.cumsum(padded, 0)
    # a stable sort by expert: keys expert·BLOCK_N + position are distinct
    key = tl.sort(expert * BLOCK_N + i)
    e_sorted = key // BLOCK_N
    # place in the sorted order minus the expert's first place = rank inside its expert's run
    rank = i - tl.gather(tl.cumsum(counts, 0) - counts, e_sorted, 0)
    dest = tl.gather(ends - padded, e_sorted, 0) + rank
    real = e_sorted < BINS
    tl.store(row_ids_ptr + dest, key % BLOCK_N, mask=real)
    tl.store(tile_expert_ptr + dest // BM, e_sorted, mask=real)  # a tile's rows all write its expert
    tl.store(rows_used_ptr, tl.sum(tl.where(b == LOCAL - 1, ends, 0), 0))


def align_kernel(topk_ids: torch.Tensor, num_experts: int, block_m: int, skip_remote: bool = False):
    """`align_by_expert` in one program (n <= ALIGN_KERNEL_MAX assignments); its outputs equal align_reference's.
    Tiles past the sorted rows keep the fill `bins` (what the reference's searchsorted gives there)."""
    flat = topk_ids.flatten()
    n = flat.numel()
    bins = num_experts + int(skip_remote)
    cap = _capacity(n, bins, block_m)
    row_ids = torch.full((cap,), n, dtype=torch.int32, device=flat.device)
    tile_expert = torch.full((cap // block_m,), bins, dtype=torch.int32, device=flat.device)
    rows_used = torch.empty(1, dtype=torch.int32, device=flat.device)
    _align_kernel[(1,)](flat, row_ids, tile_expert, rows_used, n, BINS=bins, LOCAL=num_experts, BM=block_m,
                        BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_B=triton.next_power_of_2(bins + 1),
                        num_warps=4)
    return row_ids, tile_expert, rows_used


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int, skip_remote: bool = False):
    """`align_by_expert` in torch tensor ops (~26 launches): stable argsort, counts, padded cumulative ends."""
    flat = topk_ids.flatten().long()
    n = flat.numel()
    bins = num_experts + int(skip_remote)
    counts = torch.zeros(bins, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[expert_sorted]
    dest = (ends - padded)[expert_sorted] + rank
    cap = _capacity(n, bins, block_m)
    row_ids = torch.full((cap,), n, dtype=torch.int32, device=flat.device)
    row_ids[dest] = order.to(torch.int32)
    tile_starts = torch.arange(0, cap, block_m, device=flat.device)
    tile_expert = torch.searchsorted(ends, tile_starts, right=True).to(torch.int32)
    return row_ids, tile_expert, ends[num_experts - 1 : num_experts].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, route_w_ptr, row_ids_ptr, tile_expert_ptr, rows_used_ptr,
                     num_rows, N: tl.constexpr, K: tl.constexpr,
                     stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
                     A_ROW_DIV: tl.constexpr, MUL_ROUTE_WEIGHT: tl.constexpr, A_FP8: tl.constexpr,
                     B_FP8: tl.constexpr, BLOCK_WN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, PRECISION: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    if tile * BM >= tl.load(rows_used_ptr):
        return
    rows = tl.load(row_ids_ptr + tile * BM + tl.arange(0, BM))
    row_mask = rows < num_rows
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    a_rows = rows // A_ROW_DIV
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    b_base = b_ptr + expert * stride_be
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, (K + BK - 1) // BK):
        offs_k = t * BK + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=row_mask[:, None] & mask_k[None, :],
                    other=0.0)
        b = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                    other=0.0)
        if B_FP8:
            b_s = tl.load(bs_ptr + expert * stride_bse + (offs_n // BLOCK_WN) * stride_bsn + t, mask=mask_n, other=0.0)
            if A_FP8:
                a_s = tl.load(as_ptr + a_rows * stride_asm + t, mask=row_mask, other=0.0)
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            else:
                acc += tl.dot(a, b.to(a.dtype)) * b_s[None, :]
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)
    if MUL_ROUTE_WEIGHT:
        acc *= tl.load(route_w_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_mask[:, None] & mask_n[None, :])


def _grouped_gemm(a, w, w_scale, block, out, align, a_row_div: int, route_weights=None, quantize_a=False):
    row_ids, tile_expert, rows_used, bm = align
    n, k = w.shape[1], w.shape[2]
    fp8_w = w.dtype == FP8
    bk = block[1] if fp8_w else (64 if k % 64 == 0 else 32)
    a_scale = None
    if quantize_a:
        a, a_scale = quantize_activations(a, block[1])
    bn = 128 if quantize_a else 64
    grid = (row_ids.numel() // bm, triton.cdiv(n, bn))
    _moe_gemm_kernel[grid](
        a, a_scale if a_scale is not None else a, w, w_scale if fp8_w else w, out,
        route_weights if route_weights is not None else out, row_ids, tile_expert, rows_used, out.shape[0], n, k,
        a.stride(0), a_scale.stride(0) if a_scale is not None else 0, w.stride(0), w.stride(1),
        w_scale.stride(0) if fp8_w else 0, w_scale.stride(1) if fp8_w else 0, out.stride(0),
        A_ROW_DIV=a_row_div, MUL_ROUTE_WEIGHT=route_weights is not None, A_FP8=quantize_a, B_FP8=fp8_w,
        BLOCK_WN=block[0] if fp8_w else 1, BM=bm, BN=bn, BK=bk,
        # float32 (the GPU parity tests): IEEE products, not TF32 (~1e-3 relative), to match the float32 reference
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3,
    )


def _tile_rows(assignments: int, num_experts: int) -> int:
    per_expert = assignments / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, block: tuple[int, int] | None = None,
                  skip_remote: bool = False) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate | up), w2 [E, H, I], bf16/fp16/fp32 or FP8 with [E, ., .] block scales;
    topk_ids/topk_weights [T, k] -> Σ_k weight · down(silu(gate(x)) · up(x)) per token, [T, H] in x's dtype.
    `skip_remote`: a slot with id E (its expert is on another rank) is not computed and adds zero."""
    t, k = topk_ids.shape
    num_experts, inner = w13.shape[0], w2.shape[2]
    assignments = t * k
    bm = _tile_rows(assignments, num_experts)
    align = (*align_by_expert(topk_ids, num_experts, bm, skip_remote), bm)
    fp8_w = w13.dtype == FP8
    quantize_a = fp8_w and assignments > STREAMING_MAX_ROWS
    x = x.contiguous()
    gate_up = torch.empty(assignments, 2 * inner, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, w13_scale, block, gate_up, align, a_row_div=k, quantize_a=quantize_a)
    gate, up = gate_up.chunk(2, dim=-1)
    act = (F.silu(gate) * up).contiguous()
    # skipped slots' rows are never written: zeros, so the sum over a token's slots adds nothing for them
    down = (torch.zeros if skip_remote else torch.empty)(assignments, w2.shape[1], dtype=x.dtype, device=x.device)
    weights = topk_weights.flatten().to(torch.float32).contiguous()
    _grouped_gemm(act, w2, w2_scale, block, down, align, a_row_div=1, route_weights=weights, quantize_a=quantize_a)
    return down.view(t, k, -1).sum(dim=1)
