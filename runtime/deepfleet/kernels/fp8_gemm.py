"""Block-scaled FP8 matrix multiply: y = x · Wᵀ with W float8_e4m3fn [N, K] and float32 scales per (BN_q × BK_q)
block of W (DeepSeek's 128×128). Reference: `deepfleet.quant.fp8.dequantize` then a matmul.

Two kernels, chosen by the number of rows M:
- M ≤ 64 (decode): weight streaming. The step is bound by reading W, so x stays in the compute dtype, each FP8
  tile is widened in registers and the block scale is applied once per 128-wide K step to the partial sum.
  K is split across programs when N alone gives too few programs to keep every SM reading (down_proj at batch 1).
- larger M (prefill, big batches): x is quantized per token and group of 128 features (1×128, DeepSeek's dynamic
  activation scheme) and both operands go through FP8 tensor cores; per K step the partial sum is scaled by
  (x group scale) × (W block scale), which is exact for scales constant over the step.
Both need the K block to be the kernel's K step (a power of two ≥ 16). K and the loop counts are compile-time
constants (one compilation per layer shape; also, Triton's interpreter cannot loop to a runtime bound under
numpy ≥ 2.4); M, the batch, stays a runtime value so one compiled kernel serves every batch size."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
STREAMING_MAX_ROWS = 64


@triton.jit
def _round_to_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest e4m3 value, ties to even, still as float32: the FP8 cast
    after it is exact. Triton 3.6's interpreter rounds float32 -> fp8 without carrying a mantissa overflow into the
    exponent (124.7 -> 64); rounding here first keeps the kernels' results the same under the interpreter and on
    the GPU. Adding and subtracting 1.5 * 2^23 * step rounds to a multiple of step, the e4m3 spacing at x."""
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step_exponent = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; below 2^-6 the subnormal spacing 2^-9
    step = ((step_exponent + 127) << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0
    return (x + magic) - magic


@triton.jit
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-10) / 448.0
    q = _round_to_e4m3(tl.clamp(x / scale, -448.0, 448.0))
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + g, scale)


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M, K/group]): per token and group of `group` features."""
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        _quant_groups_kernel[(m, groups)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0), GROUP=group)
    return q, s


@triton.jit
def _streaming_kernel(x_ptr, w_ptr, ws_ptr, out_ptr, M, N, K: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
                      stride_xm, stride_wn, stride_wsn, stride_os, stride_om,
                      BLOCK_WN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n, split = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        t = split * TILES_PER_SPLIT + i
        offs_k = t * BK + tl.arange(0, BK)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                    other=0.0)
        ws = tl.load(ws_ptr + (offs_n // BLOCK_WN) * stride_wsn + t, mask=mask_n & (t * BK < K), other=0.0)
        acc += tl.dot(x, w.to(x.dtype)) * ws[None, :]
    tl.store(out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _w8a8_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, bias_ptr, M, N, K: tl.constexpr,
                 stride_am, stride_asm, stride_wn, stride_wsn, stride_cm,
                 HAS_BIAS: tl.constexpr, BLOCK_WN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, (K + BK - 1) // BK):
        offs_k = t * BK + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                    other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + t, mask=mask_m, other=0.0)
        w_s = tl.load(ws_ptr + (offs_n // BLOCK_WN) * stride_wsn + t, mask=mask_n, other=0.0)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _check_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    bk = block[1]
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"weight_block_size {list(block)}: the FP8 kernels need a power-of-two K block >= 16")
    n, k = weight.shape
    if tuple(scale.shape) != (triton.cdiv(n, block[0]), triton.cdiv(k, bk)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight {(n, k)} in blocks {block}")


def _streaming(x, weight, scale, block, bias, num_sms: int):
    m, k = x.shape
    n = weight.shape[0]
    bm = max(16, triton.next_power_of_2(m))
    bn = 64 if n >= 4096 else 32
    bk = block[1]
    k_tiles = triton.cdiv(k, bk)
    n_progs = triton.cdiv(n, bn)
    split = max(1, min(triton.cdiv(2 * num_sms, n_progs), k_tiles // 4 or 1))
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)
    partial = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _streaming_kernel[(n_progs, split)](
        x, weight, scale, partial, m, n, k, tiles_per_split,
        x.stride(0), weight.stride(0), scale.stride(0), partial.stride(0), partial.stride(1),
        BLOCK_WN=block[0], BM=bm, BN=bn, BK=bk, num_warps=4, num_stages=4,
    )
    out = partial[0] if split == 1 else partial.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _w8a8(x, weight, scale, block, bias):
    m, k = x.shape
    n = weight.shape[0]
    a, a_s = quantize_activations(x, block[1])
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn = (64, 128) if m <= 128 else (128, 128)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w8a8_kernel[grid](
        a, a_s, weight, scale, out, bias if bias is not None else out, m, n, k,
        a.stride(0), a_s.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_WN=block[0], BM=bm, BN=bn, BK=block[1], GROUP_M=8,
        num_warps=8 if bm == 128 else 4, num_stages=3,
    )
    return out


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter (tests): any value exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) · (weight [N, K] FP8 with block scales)ᵀ (+ bias) -> [M, N] in x's dtype."""
    _check_block(weight, scale, block)
    x = x.contiguous()
    if x.shape[0] <= STREAMING_MAX_ROWS:
        return _streaming(x, weight, scale, block, bias, _num_sms(x.device))
    return _w8a8(x, weight, scale, block, bias)
