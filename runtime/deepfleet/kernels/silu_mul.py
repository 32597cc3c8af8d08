"""SiLU-gated activation, silu(gate) * up over rows [gate | up], as one Triton kernel: each program takes BLOCK
columns of one row.

`silu_mul(x)` for x [..., 2n] returns [..., n]. The rounding is the plain PyTorch code's (models/layers.py
`silu_and_mul`): silu(gate) is computed in float32 and rounded to the activation dtype, then multiplied by up in
float32 and rounded again.

Why not torch.compile: the compiled version (dynamic shapes) moved 1.26 TB/s at 256 decode rows of the 7B shape on
the H200 (2026-12-02), a third of copy speed; likely because with the row width a symbol it indexes one flat range
(a division per element) and cannot prove its loads aligned, where this kernel's column blocks load 16 bytes a
thread.
Outside a CUDA graph a compiled region also costs ~100 us of host time per call (kernels/rms_norm.py), a launch a
tenth of that."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(out, x, n, blocks_per_row, stride_x, stride_o, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // blocks_per_row).to(tl.int64)
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * stride_o + cols, (act * up).to(out.dtype.element_ty), mask=mask)


def default_config(rows: int, n: int) -> tuple[int, int]:
    """(BLOCK, num_warps), 8 elements (16 bytes of bf16) a thread: 1024-wide blocks once there are rows enough to
    fill the GPU, 512 for a few rows so that even one row spreads over tens of programs. Swept on the H200
    (bench/decode_elementwise.py, 2026-12-02, BLOCK 512-4096 at 2-8 warps, 1-4096 rows of both R1-Distill-Qwen
    widths): within 1% of the fastest at every size but 1.5B at 256 rows (4%)."""
    if rows * n >= 64 * 2048:
        return 1024, 4
    return 512, 2


def silu_mul(x: torch.Tensor, config: tuple[int, int] | None = None) -> torch.Tensor:
    """x [..., 2n] (rows contiguous) -> silu(x[..., :n]) * x[..., n:] [..., n]; `config` (BLOCK, num_warps) overrides
    default_config (benchmarks, tests)."""
    if x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_mul: expected [..., 2n] with contiguous features, got {tuple(x.shape)}")
    n = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * n)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0] and n:
        block, warps = config or default_config(rows.shape[0], n)
        per_row = triton.cdiv(n, block)
        _silu_mul_kernel[(rows.shape[0] * per_row,)](out, rows, n, per_row, rows.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=warps)
    return out.view(*x.shape[:-1], n)
