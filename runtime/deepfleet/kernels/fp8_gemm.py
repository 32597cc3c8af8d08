"""Block-scaled FP8 matrix multiply: y = x · Wᵀ with W float8_e4m3fn [N, K] and float32 scales per (BN_q × BK_q)
block of W (DeepSeek's 128×128). Reference: `deepfleet.quant.fp8.dequantize` then a matmul.

Four paths; which one and with which tiles is a per-shape, per-row-count choice (`config_for`):
- "stream" (up to 64 rows): weight streaming through tensor cores: x stays in the compute dtype, each FP8 tile
  is widened in registers and the block scale is applied once per 128-wide K step to the partial sum. K is
  split across programs when N alone gives too few programs to keep every SM reading; the float32 partial sums
  are added by one small kernel (with the bias, in the output dtype) in a fixed order, so results do not change
  from run to run as atomics would make them.
- "w8a8": x is quantized per token and group of 128 features (1×128, DeepSeek's dynamic activation scheme) and
  both operands go through FP8 tensor cores; per K step the partial sum is scaled by (x group scale) × (W block
  scale), which is exact for scales constant over the step. On the H200 this is also the fastest way to stream
  a big weight (>= 100 MB) at batch 1, with 16-row tiles: no widening in registers. K may be split as in the
  streaming kernel (a wide-K, narrow-N weight at tens of rows otherwise gives a few dozen programs).
- "scaled_mm": the same 1×128 activation quantization, then torch._scaled_mm's DeepSeek scaling (cuBLASLt's
  1×128 × 128×128 block-scaled FP8 GEMM on SM90), on the weight and its scales as they are (`scaled_mm_fits`
  says which calls it takes). Not a Triton kernel: the tuner checks it against the reference on the device before
  it enters a table.
- "gemv" (one row only): W8A16 without tensor cores: each program streams BN weight rows (16-byte loads along
  K), widens them in registers and multiplies by x with the block scale folded into x; K may be split, the
  program arriving last at its row block adding the splits' partials in a fixed order (counters in
  kernels/workspace.py), so a batch-1 projection is one launch: no activation quantization, no split-sum kernel.

Tiles per (N, K) and row count come from a table measured on the device (kernels/fp8_configs/<device>.json,
written by bench/fp8_tune.py; the nearest measured row count wins, as vLLM/SGLang do for their block-FP8 GEMM);
shapes not in it get `default_config`. The K block must be the kernels' K step (a power of two >= 16). K and
the loop counts are compile-time constants (one compilation per layer shape; also, Triton's interpreter cannot
loop to a runtime bound under numpy >= 2.4); M stays a runtime value (not specialised on M == 1), so one
compiled kernel serves a range of batch sizes."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from deepfleet.kernels import pdl
from deepfleet.kernels.gemv import add_norm_outputs, one_row_workspace, store_rows

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
STREAMING_MAX_ROWS = 64  # the fused MoE's own choice between weight streaming and FP8 activations
CONFIG_DIR = Path(__file__).with_name("fp8_configs")
# one-row GEMV tiles (BN, BK, num_warps, SPLIT) that start-up timing tries on each batch-1 projection
# (models/layers.py choose_gemv), each a compilation per K: the fastest for some 7B projection on the H200
# (bench/RESULTS.md, 2026-12-02 fp8b: qkv and o, down, the SiLU·mul epilogue on gate_up)
GEMV_CANDIDATES = [(4, 512, 4, 1), (8, 512, 4, 2), (16, 256, 4, 1)]


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
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, stride_sg, GROUP: tl.constexpr,
                         GROUPS_PER_PROG: tl.constexpr):
    row, g0 = tl.program_id(0), tl.program_id(1) * GROUPS_PER_PROG
    groups = g0 + tl.arange(0, GROUPS_PER_PROG)
    offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10) / 448.0
    q = _round_to_e4m3(tl.clamp(x / scale[:, None], -448.0, 448.0))
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + groups * stride_sg, scale, mask=groups * GROUP < K)


def quantize_activations(x: torch.Tensor, group: int, rows_major: bool = False,
                         rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 [M, K], float32 scales [M, K/group]): per token and group of `group` features.
    `rows_major`: the scales laid out with the rows adjacent (strides (1, M)), as cuBLASLt's 1x128 scaling wants
    them. `rows` (>= M): both outputs get that many rows, the ones past M left unwritten."""
    m, k = x.shape
    rows = m if rows is None else rows
    groups = triton.cdiv(k, group)
    per_prog = min(8, triton.next_power_of_2(groups))
    q = torch.empty(rows, k, dtype=FP8, device=x.device)
    if rows_major:
        s = torch.empty(groups, rows, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    if m:
        _quant_groups_kernel[(m, triton.cdiv(groups, per_prog))](
            x, q, s, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), GROUP=group, GROUPS_PER_PROG=per_prog)
    return q, s


@triton.jit
def _store_or_partial(acc, out_ptr, bias_ptr, split, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om,
                      HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """SPLIT == 1: the result (+ bias) in out's dtype; else this split's float32 partial sum."""
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _sum_splits_kernel(partial_ptr, out_ptr, bias_ptr, M, N, stride_ps, HAS_BIAS: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(partial_ptr + s * stride_ps + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _stream_kernel(x_ptr, w_ptr, ws_ptr, out_ptr, bias_ptr, M, N, K: tl.constexpr, TILES_PER_SPLIT: tl.constexpr,
                   stride_xm, stride_wn, stride_wsn, stride_os, stride_om,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_WN: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
    _store_or_partial(acc, out_ptr, bias_ptr, split, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om,
                      HAS_BIAS, SPLIT)


@triton.jit(do_not_specialize=["M"])
def _w8a8_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, bias_ptr, M, N, K: tl.constexpr,
                 TILES_PER_SPLIT: tl.constexpr, stride_am, stride_asm, stride_wn, stride_wsn, stride_os, stride_om,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_WN: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row tiles share each weight tile while it is in L2
    pid, split = tl.program_id(0), tl.program_id(1)
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
    for i in range(0, TILES_PER_SPLIT):
        t = split * TILES_PER_SPLIT + i
        offs_k = t * BK + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                    other=0.0)
        a_s = tl.load(as_ptr + offs_m * stride_asm + t, mask=mask_m & (t * BK < K), other=0.0)
        w_s = tl.load(ws_ptr + (offs_n // BLOCK_WN) * stride_wsn + t, mask=mask_n & (t * BK < K), other=0.0)
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
    _store_or_partial(acc, out_ptr, bias_ptr, split, offs_m, offs_n, mask_m, mask_n, stride_os, stride_om,
                      HAS_BIAS, SPLIT)


@triton.jit
def _gemv_kernel(y_ptr, x_ptr, w_ptr, ws_ptr, bias_ptr, partial_ptr, counter_ptr, res_ptr, norm_w_ptr, norm_out_ptr,
                 norm_counter_ptr, eps, N, K: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, stride_wn, stride_wsn,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_WN: tl.constexpr, BLOCK_WK: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, SILU_MUL: tl.constexpr, ADD_NORM: tl.constexpr,
                 BLOCK_ROW: tl.constexpr, PDL: tl.constexpr):
    # BN divides the scale block's rows, so all BN rows share one row of block scales: the scale goes onto x
    # (one [BK] vector per step) instead of onto each weight element
    block, split = tl.program_id(0), tl.program_id(1)
    n = block * BN + tl.arange(0, BN)
    n_ok = n < N
    # rows past N read row N-1 (in bounds, no row mask on the weight loads); their sums are never stored
    rows_w = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn
    scale_row = ws_ptr + ((block * BN) // BLOCK_WN) * stride_wsn
    # SILU_MUL: the up rows follow the gate rows, N a multiple of the scale block (their own row of scales)
    rows_up = rows_w + N.to(tl.int64) * stride_wn
    scale_row_up = ws_ptr + ((N + block * BN) // BLOCK_WN) * stride_wsn
    # The split's first K tile of the weight (and its scales: no kernel writes either) is loaded before waiting for
    # the previous kernel (kernels/pdl.py), so its HBM latency overlaps that kernel's tail; x, the partials, the
    # counters and the residual only after the wait.
    t = split * TILES_PER_SPLIT
    k = t * BK + tl.arange(0, BK)
    k_ok = k < K
    acc = tl.load(rows_w + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
    scale = tl.load(scale_row + k // BLOCK_WK, mask=k_ok, other=0.0)
    acc_up = tl.zeros([BN, BK], tl.float32)
    scale_up = scale
    if SILU_MUL:
        acc_up = tl.load(rows_up + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)
        scale_up = tl.load(scale_row_up + k // BLOCK_WK, mask=k_ok, other=0.0)
    pdl.enter(PDL)
    xv = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    acc *= (xv * scale)[None, :]
    if SILU_MUL:
        acc_up *= (xv * scale_up)[None, :]
    for i in range(1, TILES_PER_SPLIT):
        t = split * TILES_PER_SPLIT + i
        k = t * BK + tl.arange(0, BK)
        k_ok = k < K
        xv = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        xs = xv * tl.load(scale_row + k // BLOCK_WK, mask=k_ok, other=0.0)
        acc += tl.load(rows_w + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32) * xs[None, :]
        if SILU_MUL:
            xs_up = xv * tl.load(scale_row_up + k // BLOCK_WK, mask=k_ok, other=0.0)
            acc_up += tl.load(rows_up + k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32) * xs_up[None, :]
    out = tl.sum(acc, 1)
    if SPLIT > 1:
        tl.store(partial_ptr + split * N + n, out, mask=n_ok)
        # all of this program's partial stored before its arrival (barrier); acq_rel releases it to the last
        # program to arrive, whose loads (.cg: from L2) then see every split's partial
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + block, 1, sem="acq_rel") != SPLIT - 1:
            return
        out = tl.zeros([BN], tl.float32)
        for s in tl.static_range(SPLIT):  # fixed order: the same sum whichever program arrives last
            out += tl.load(partial_ptr + s * N + n, mask=n_ok, other=0.0, cache_modifier=".cg")
        tl.store(counter_ptr + block, 0)  # zero again for the next launch / graph replay
    store_rows(y_ptr, out, tl.sum(acc_up, 1), n, n_ok, N, bias_ptr, res_ptr, norm_w_ptr, norm_out_ptr,
               norm_counter_ptr, eps, HAS_BIAS, SILU_MUL, ADD_NORM, BLOCK_ROW)


def _check_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    bk = block[1]
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"weight_block_size {list(block)}: the FP8 kernels need a power-of-two K block >= 16")
    n, k = weight.shape
    if tuple(scale.shape) != (triton.cdiv(n, block[0]), triton.cdiv(k, bk)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit weight {(n, k)} in blocks {block}")


# ---- tile choice ---------------------------------------------------------------------------------------------------
def auto_split(n_programs: int, k_tiles: int, num_sms: int) -> int:
    """K splits that give about 2 programs per SM, each with at least 2 K steps."""
    return max(1, min(triton.cdiv(2 * num_sms, n_programs), k_tiles // 2 or 1))


def default_config(m: int, n: int, k: int, block: tuple[int, int], num_sms: int) -> dict:
    """Tiles for a shape the measured table lacks, after the H200 table (bench/RESULTS.md): FP8 activations with
    16-row tiles stream the big weights fastest even for one row; smaller weights want the K split of the
    streaming kernel; 64-row FP8 tiles above 64 rows."""
    if m <= 32 and n * k < (100 << 20):
        bn = 32
        return dict(kernel="stream", BN=bn, SPLIT=auto_split(triton.cdiv(n, bn), triton.cdiv(k, block[1]), num_sms),
                    num_warps=4, num_stages=4)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return dict(kernel="w8a8", BM=bm, BN=64 if m <= 128 else 128, GROUP_M=8, num_warps=4, num_stages=4)


def _device_key(device: torch.device) -> str:
    return "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device))


@functools.cache
def _measured_table(device_key: str) -> dict[tuple[int, int], dict[int, dict]]:
    path = CONFIG_DIR / f"{device_key}.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    table = {}
    for shape, by_rows in raw["configs"].items():
        n, k = (int(part.split("=")[1]) for part in shape.split(","))
        table[(n, k)] = {int(rows): cfg for rows, cfg in by_rows.items()}
    return table


def scaled_mm_fits(m: int, n: int, k: int, block: tuple[int, int], x: torch.Tensor) -> bool:
    """What torch._scaled_mm's 1x128 x 128x128 scaling takes (torch 2.11, ScaledBlas.cpp): CUDA, 128x128 blocks,
    K in whole blocks whose count is a multiple of 4 (scale_b's stride), N a multiple of 16, a 16-bit output.
    Also an SM90 GPU, which torch checks itself: the path is only taken from a table the tuner measured, and the
    tuner keeps only candidates that ran and matched the reference on that GPU."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and tuple(block) == (128, 128)
            and k % 512 == 0 and n % 16 == 0 and m > 0)


def _runs(cfg: dict, m: int, n: int, k: int, block: tuple[int, int], x: torch.Tensor) -> bool:
    if cfg["kernel"] == "gemv":
        return m == 1 and block[0] % cfg["BN"] == 0
    if cfg["kernel"] == "stream":
        return m <= STREAMING_MAX_ROWS
    if cfg["kernel"] == "scaled_mm":
        return scaled_mm_fits(m, n, k, block, x)
    return True


def config_for(x: torch.Tensor, n: int, block: tuple[int, int]) -> dict:
    """Tiles for x [M, K] times an [N, K] weight: the measured entry of the nearest measured row count whose kernel
    runs this call, else `default_config`."""
    m, k = x.shape
    if x.device.type == "cuda":
        picked = pick_measured(_measured_table(_device_key(x.device)).get((n, k), {}), m,
                               lambda cfg: _runs(cfg, m, n, k, block, x))
        if picked is not None:
            return picked
    return default_config(m, n, k, block, _num_sms(x.device))


def pick_measured(measured: dict[int, dict], m: int, runs) -> dict | None:
    """The entry of the measured row count nearest m (ties: the smaller) among those `runs(cfg)` accepts."""
    usable = [rows for rows, cfg in measured.items() if runs(cfg)]
    return measured[min(usable, key=lambda rows: (abs(rows - m), rows))] if usable else None


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter (tests): any value exercises the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- launches ------------------------------------------------------------------------------------------------------
def _split_k(k: int, block: tuple[int, int], cfg: dict) -> tuple[int, int]:
    """(K steps per split, splits) for the config's SPLIT (1 when it has none), no split empty."""
    k_tiles = triton.cdiv(k, block[1])
    per_split = triton.cdiv(k_tiles, max(1, min(cfg.get("SPLIT", 1), k_tiles)))
    return per_split, triton.cdiv(k_tiles, per_split)


def _split_target(out: torch.Tensor, split: int) -> torch.Tensor:
    """Where a kernel with `split` K splits writes: the output itself, or float32 partial sums per split."""
    return out if split == 1 else torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)


def _sum_splits(target, out, bias, split):
    """The split partial sums (+ bias) into out, in a fixed order."""
    if split > 1:
        m, n = out.shape
        block_elems = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block_elems),)](
            target, out, bias if bias is not None else out, m, n, target.stride(0), HAS_BIAS=bias is not None,
            SPLIT=split, BLOCK=block_elems, num_warps=4)
    return out


def _stream(x, weight, scale, block, bias, cfg):
    m, k = x.shape
    n = weight.shape[0]
    per_split, split = _split_k(k, block, cfg)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = _split_target(out, split)
    _stream_kernel[(triton.cdiv(n, cfg["BN"]), split)](
        x, weight, scale, target, bias if bias is not None else out, m, n, k, per_split,
        x.stride(0), weight.stride(0), scale.stride(0), target.stride(0) if split > 1 else 0, n,
        HAS_BIAS=bias is not None, SPLIT=split, BLOCK_WN=block[0], BM=max(16, triton.next_power_of_2(m)),
        BN=cfg["BN"], BK=block[1], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return _sum_splits(target, out, bias, split)


def gemv_config(tiles: tuple[int, int, int, int]) -> dict:
    """GEMV_CANDIDATES' (BN, BK, num_warps, SPLIT) as fp8_matmul's config."""
    bn, bk, warps, split = tiles
    return dict(kernel="gemv", BN=bn, BK=bk, num_warps=warps, SPLIT=split)


def _launch_gemv(y, x, weight, scale, block, bias, cfg, silu_mul=False, norm=None):
    """y [1, N] = x · Wᵀ (+ bias) through the one-row kernel (with `silu_mul`: W = [gate; up], y = silu(gate)·up;
    with `norm` = (residual, norm weight, normed out, eps): y = the product + residual, normed out its RMSNorm)."""
    k = x.shape[1]
    n = y.shape[1]
    bn, bk = cfg["BN"], cfg["BK"]
    k_tiles = triton.cdiv(k, bk)
    per_split = triton.cdiv(k_tiles, max(1, min(cfg.get("SPLIT", 1), k_tiles)))
    split = triton.cdiv(k_tiles, per_split)
    if silu_mul and (split > 1 or n % block[0]):
        raise ValueError(f"fp8 gemv: SiLU·mul needs one K split and whole scale blocks per half (tiles {cfg}, "
                         f"N {n})")
    blocks = triton.cdiv(n, bn)
    partial, counter, (res, norm_w, norm_out, eps), norm_counter = one_row_workspace(y, blocks, split, norm,
                                                                                      "fp8 gemv")
    _gemv_kernel[(blocks, split)](
        y, x, weight, scale, y if bias is None else bias, partial, counter, res, norm_w, norm_out, norm_counter, eps,
        n, k, per_split, weight.stride(0), scale.stride(0), HAS_BIAS=bias is not None, SPLIT=split,
        BLOCK_WN=block[0], BLOCK_WK=block[1], BN=bn, BK=bk, SILU_MUL=silu_mul,
        ADD_NORM=norm is not None, BLOCK_ROW=triton.next_power_of_2(n) if norm else 1, PDL=(on := pdl.enabled(x)),
        num_warps=cfg["num_warps"], **pdl.launch_options(on))


def _gemv(x, weight, scale, block, bias, cfg):
    y = x.new_empty(1, weight.shape[0])
    _launch_gemv(y, x, weight, scale, block, bias, cfg)
    return y


def _check_one_row(x, weight, scale, block, cfg):
    _check_block(weight, scale, block)
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1] or x.stride(1) != 1 \
            or not _runs(cfg, 1, weight.shape[0], x.shape[1], block, x):
        raise ValueError(f"fp8 gemv: x {tuple(x.shape)} (one row), weight {tuple(weight.shape)} and tiles {cfg} "
                         "do not fit")


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                  bias: torch.Tensor | None, cfg: dict) -> torch.Tensor:
    """x [1, K], weight [2N, K] FP8 = [gate; up] with block scales, bias [2N] or None -> silu(x gateᵀ) · (x upᵀ)
    [1, N] in x's dtype, in one launch of the one-row kernel at tiles `cfg` (a "gemv" config, SPLIT 1): each
    product rounded to x's dtype, SiLU·mul in float32 on those, rounded once (kernels/gemv.py's epilogue)."""
    _check_one_row(x, weight, scale, block, cfg)
    y = x.new_empty(1, weight.shape[0] // 2)
    _launch_gemv(y, x, weight, scale, block, bias, cfg, silu_mul=True)
    return y


def gemv_add_norm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                  bias: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(y + residual) · norm_weight, y + residual), both [1, N] in x's dtype, y = x · Wᵀ (+ bias): the
    residual add and RMSNorm after the projection in the one-row kernel's launch at tiles `cfg` (kernels/gemv.py
    gemv_add_norm's epilogue and rounding)."""
    _check_one_row(x, weight, scale, block, cfg)
    summed, normed = add_norm_outputs(x, weight.shape[0], residual, norm_weight, "fp8 gemv_add_norm")
    _launch_gemv(summed, x, weight, scale, block, bias, cfg, norm=(residual, norm_weight, normed, eps))
    return normed, summed


def _w8a8(x, weight, scale, block, bias, cfg):
    m, k = x.shape
    n = weight.shape[0]
    a, a_s = quantize_activations(x, block[1])
    per_split, split = _split_k(k, block, cfg)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = _split_target(out, split)
    bm, bn = cfg["BM"], cfg["BN"]
    _w8a8_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), split)](
        a, a_s, weight, scale, target, bias if bias is not None else out, m, n, k, per_split,
        a.stride(0), a_s.stride(0), weight.stride(0), scale.stride(0), target.stride(0) if split > 1 else 0, n,
        HAS_BIAS=bias is not None, SPLIT=split, BLOCK_WN=block[0], BM=bm, BN=bn, BK=block[1],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return _sum_splits(target, out, bias, split)


def scaled_mm_operands(x, weight, scale, block):
    """(A, B, scale_a, scale_b) for torch._scaled_mm's DeepSeek scaling (1x128 activations x 128x128 weight blocks,
    cuBLASLt on SM90): A [M', K] FP8 row-major, B = Wᵀ [K, N] column-major, scale_a [M', K/128] with strides
    (1, M'), scale_b = scaleᵀ [K/128, N/128] with strides (1, K/128), which torch accepts when K/128 is a multiple of
    4 (`scaled_mm_fits`). No copies of the weight or its scales. M' is M rounded up to a multiple of 4, which
    cuBLASLt needs for scale_a's column stride (H200: 1, 2, 3, 5, 6, 65, 66 rows refused, 8 and 68 run); the rows
    past M hold whatever memory held and give output rows that are cut off (each output row reads only its own
    row of A and of scale_a)."""
    a, a_s = quantize_activations(x, block[1], rows_major=True, rows=-(-x.shape[0] // 4) * 4)
    return a, weight.t(), a_s, scale.t()


def _scaled_mm(x, weight, scale, block, bias, cfg):
    a, b, a_s, b_s = scaled_mm_operands(x, weight, scale, block)
    out = torch._scaled_mm(a, b, scale_a=a_s, scale_b=b_s, out_dtype=x.dtype)[:x.shape[0]]
    return out if bias is None else out.add_(bias)


KERNELS = {"gemv": _gemv, "stream": _stream, "w8a8": _w8a8, "scaled_mm": _scaled_mm}


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) · (weight [N, K] FP8 with block scales)ᵀ (+ bias) -> [M, N] in x's dtype.
    `config` overrides the table's tiles (the tuner, tests)."""
    _check_block(weight, scale, block)
    x = x.contiguous()
    m, k = x.shape
    cfg = config or config_for(x, weight.shape[0], block)
    if not _runs(cfg, m, weight.shape[0], k, block, x):
        raise ValueError(f"tiles {cfg} cannot run {m} rows")
    return KERNELS[cfg["kernel"]](x, weight, scale, block, bias, cfg)
