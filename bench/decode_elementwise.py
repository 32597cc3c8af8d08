"""The dense decode graph's steps around its GEMMs (GPU): `python bench/decode_elementwise.py --out DIR`.

For the R1-Distill-Qwen shapes (1.5B, 7B) at 1-4096 rows, each timed in one CUDA graph of repeated calls over
rotating inputs (more bytes than the L2 holds, so data comes from memory as in a decode step), GPU time per call
and the bandwidth of the bytes it must move (inputs read once, output written once):
- SiLU·mul: the Triton kernel (kernels/silu_mul.py) at its default and at each candidate (BLOCK, num_warps),
  against the torch.compile version it replaces (models/layers.py before 2026-12-02: dynamic shapes), after a
  check on CUDA against the plain PyTorch code (same rounding: equal but for the exponential's last bit);
- the logits: the LM head as the decode graph ran it (bf16 product, float32 conversion, copy into the graph's
  buffer) against the float32 product written straight into the buffer (distributed/layers.py logits);
- the residual add + RMSNorm kernel (kernels/rms_norm.py) at each num_warps, and the QKV projection with and
  without its bias (whether cuBLAS's bias epilogue costs time).
Prints one table per part; writes every figure as a results.jsonl record to DIR/decode_elementwise.jsonl as it goes."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from deepfleet.engine.benchmark import SHAPES
from deepfleet.kernels import rms_norm as rms_norm_module
from deepfleet.kernels.silu_mul import default_config, silu_mul

ROWS = (1, 64, 256, 512, 1024, 4096)
SILU_CONFIGS = [(512, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 8)]  # (BLOCK, num_warps); holds the defaults
ROTATE_BYTES = 256 * 2**20  # inputs per graph: 5x the H200's 50 MB L2
DTYPE = torch.bfloat16


def graph_us(calls: list) -> float:
    """GPU time per call of `calls` (closures) captured in one CUDA graph and replayed."""
    for c in calls:
        c()  # compiles, settles cuBLAS's choice
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / 5 / len(calls)


def rotating(shape: tuple[int, ...], min_calls: int = 16) -> tuple[list[torch.Tensor], int]:
    """Distinct random inputs of `shape` adding up to ROTATE_BYTES (at least one), and how many calls to time."""
    nbytes = math.prod(shape) * DTYPE.itemsize
    copies = max(1, min(64, ROTATE_BYTES // nbytes))
    return [torch.randn(shape, device="cuda", dtype=DTYPE) for _ in range(copies)], max(min_calls, copies)


def cycle(fn, inputs: list[torch.Tensor], calls: int) -> list:
    return [lambda x=x: fn(x) for x in (inputs * calls)[:calls]]


def plain_silu_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class Records:
    """results.jsonl records, each written as it is made (a run stopped at its time limit keeps what it measured)."""

    def __init__(self, path: Path, commit: str):
        self.file, self.commit = open(path, "w"), commit  # noqa: SIM115  (open for the whole run)
        self.device = torch.cuda.get_device_name()

    def add(self, shape: str, workload: str, metric: str, value: float, unit: str) -> None:
        record = {"date": datetime.date.today().isoformat(), "device": self.device, "commit": self.commit,
                  "shape": shape, "workload": workload, "metric": metric, "value": round(value, 3), "unit": unit}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def check_silu(shapes: list[str]) -> None:
    """The kernel against the plain PyTorch code on CUDA, compiled, at every candidate config."""
    for shape in shapes:
        n = SHAPES[shape]["intermediate_size"]
        for rows in (1, 7, 256):
            x = 4 * torch.randn(rows, 2 * n, device="cuda", dtype=DTYPE)
            want = plain_silu_mul(x).float()
            equal = []
            for config in SILU_CONFIGS:
                got = silu_mul(x, config).float()
                off = (got - want).abs() > 2**-7 * want.abs() + 1e-6  # more than one bf16 ulp (the two roundings)
                assert not off.any(), f"silu_mul {shape} rows {rows} {config}: {int(off.sum())} values off"
                equal.append((got == want).float().mean().item())
            print(f"check silu_mul {shape} x {rows} rows: within 1 ulp at every config, "
                  f"{100 * min(equal):.3f}% bit-equal to the plain code")


def time_silu(shapes: list[str], rec: Records) -> None:
    compiled = torch.compile(plain_silu_mul, dynamic=True, fullgraph=True)  # as models/layers.py compiled it
    print(f"{'silu_mul':<10}{'rows':>6}  {'compiled us':>12}{'TB/s':>6}  {'default us':>11}{'TB/s':>6}  "
          f"{'best config':<12}{'us':>8}")
    for shape in shapes:
        n = SHAPES[shape]["intermediate_size"]
        for rows in ROWS:
            inputs, calls = rotating((rows, 2 * n))
            moved = 3 * rows * n * DTYPE.itemsize
            old = graph_us(cycle(compiled, inputs, calls))
            new = graph_us(cycle(silu_mul, inputs, calls))
            sweep = {c: graph_us(cycle(lambda x, c=c: silu_mul(x, c), inputs, calls)) for c in SILU_CONFIGS}
            best = min(sweep, key=sweep.get)
            print(f"{shape:<10}{rows:>6}  {old:>12.2f}{moved / old / 1e6:>6.2f}  {new:>11.2f}{moved / new / 1e6:>6.2f}"
                  f"  {str(best):<12}{sweep[best]:>8.2f}   default {default_config(rows, n)}; "
                  + " ".join(f"{c[0]}/{c[1]}:{t:.2f}" for c, t in sweep.items()))
            tag = f"R1-Distill-Qwen-{shape.upper()} silu_mul {rows}x{n}"
            rec.add(tag, "torch.compile (dynamic), before", "gpu_us", old, "us")
            rec.add(tag, "Triton kernel, default config", "gpu_us", new, "us")
            rec.add(tag, "Triton kernel, default config", "bandwidth", moved / new / 1e6, "TB/s")
            for c, t in sweep.items():
                rec.add(tag, f"Triton kernel BLOCK {c[0]} warps {c[1]}", "gpu_us", t, "us")
    torch.cuda.empty_cache()


def time_logits(rec: Records) -> None:
    cfg = SHAPES["7b"]
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    weight = torch.randn(vocab, h, device="cuda", dtype=DTYPE) * h**-0.5
    buffer = torch.empty(512, vocab, device="cuda", dtype=torch.float32)
    for rows in (1, 256, 512):
        hidden = torch.randn(rows, h, device="cuda", dtype=DTYPE)
        out = buffer[:rows]

        def before(hidden=hidden, out=out):
            out.copy_(F.linear(hidden, weight).float())

        def after(hidden=hidden, out=out):
            torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)

        before()
        want = out.clone()
        after()
        exact = hidden.double() @ weight.double().t()
        err_after = (out.double() - exact).abs().max().item()
        err_before = (want.double() - exact).abs().max().item()
        verdict = "ok" if err_after <= err_before else "FAIL: the float32 product is further from float64"
        t_before, t_after = graph_us([before] * 4), graph_us([after] * 4)
        print(f"logits 7b x {rows} rows: before {t_before:.1f} us, after {t_after:.1f} us; max error vs float64 "
              f"{err_before:.2e} -> {err_after:.2e} ({verdict})")
        tag = f"R1-Distill-Qwen-7B LM head {rows}x{vocab}x{h}"
        rec.add(tag, "bf16 GEMM + float32 conversion + copy into the graph buffer, before", "gpu_us", t_before,
                "us")
        rec.add(tag, "GEMM with float32 out_dtype into the graph buffer", "gpu_us", t_after, "us")
    torch.cuda.empty_cache()


def _rms_launch(x, r, out, res_out, weight, warps) -> None:
    """kernels/rms_norm.py's launch with the residual, at `warps` warps (without PDL: one kernel after another of
    its own, nothing to overlap)."""
    rows, h = x.shape
    rms_norm_module._rms_norm_kernel[(rows,)](
        out, res_out, x, r, weight, 1e-6, h, x.stride(0), r.stride(0), out.stride(0), res_out.stride(0),
        BLOCK=triton.next_power_of_2(h), HAS_RESIDUAL=True, PDL=False, num_warps=warps)


def time_rms_norm(rec: Records) -> None:
    for shape in ("1.5b", "7b"):
        h = SHAPES[shape]["hidden_size"]
        w = torch.randn(h, device="cuda", dtype=DTYPE)
        for rows in (256, 512):
            xs, calls = rotating((rows, h))
            rs, _ = rotating((rows, h))
            outs = [(torch.empty_like(xs[0]), torch.empty_like(xs[0])) for _ in range(calls)]
            args = [(xs[i % len(xs)], rs[i % len(rs)], *outs[i], w) for i in range(calls)]
            shipped = min(16, max(1, triton.next_power_of_2(h) // 256))  # as kernels/rms_norm.py launches it
            times = {wp: graph_us([lambda a=a, wp=wp: _rms_launch(*a, wp) for a in args])
                     for wp in sorted({2, 4, 8, 16, shipped})}
            print(f"rms_norm + residual {shape} {rows}x{h}: " + ", ".join(f"{wp} warps {t:.2f} us"
                                                                          for wp, t in times.items())
                  + f" (shipped: {shipped} warps; {4 * rows * h * 2 / times[shipped] / 1e6:.2f} TB/s)")
            for wp, t in times.items():
                rec.add(f"R1-Distill-Qwen-{shape.upper()} rms_norm+residual {rows}x{h}", f"num_warps {wp}",
                        "gpu_us", t, "us")
    torch.cuda.empty_cache()


def time_qkv_bias(rec: Records) -> None:
    for shape in ("1.5b", "7b"):
        cfg = SHAPES[shape]
        h = cfg["hidden_size"]
        n = h + 2 * h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
        layers = cfg["num_hidden_layers"]
        ws = [torch.randn(n, h, device="cuda", dtype=DTYPE) * h**-0.5 for _ in range(layers)]
        bs = [torch.randn(n, device="cuda", dtype=DTYPE) for _ in range(layers)]
        x = torch.randn(256, h, device="cuda", dtype=DTYPE)
        with_bias = graph_us([lambda w=w, b=b, x=x: F.linear(x, w, b) for w, b in zip(ws, bs, strict=True)])
        without = graph_us([lambda w=w, x=x: F.linear(x, w) for w in ws])
        flops = 2 * 256 * n * h
        print(f"qkv {shape} 256x{n}x{h}: with bias {with_bias:.2f} us ({flops / with_bias / 1e6:.0f} TFLOP/s), "
              f"without {without:.2f} us ({flops / without / 1e6:.0f} TFLOP/s)")
        tag = f"R1-Distill-Qwen-{shape.upper()} qkv projection 256x{n}x{h}"
        rec.add(tag, "F.linear with bias (cuBLAS)", "gpu_us", with_bias, "us")
        rec.add(tag, "F.linear without bias (cuBLAS)", "gpu_us", without, "us")
    torch.cuda.empty_cache()


def commit() -> str:
    env = os.environ.get("DEEPFLEET_COMMIT")
    if env:
        return env
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["7b", "1.5b"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch._inductor.config.compile_threads = 1  # one small kernel: no compile-worker pool to start
    rec = Records(args.out / "decode_elementwise.jsonl", commit())
    check_silu(args.shape)
    time_silu(args.shape, rec)
    time_logits(rec)
    time_rms_norm(rec)
    time_qkv_bias(rec)
