"""Batch-1 GEMV tiles against cuBLAS (GPU): `python bench/gemv_sweep.py --shape 1.5b 7b`.

For each projection of the R1-Distill-Qwen shapes (QKV with bias, O, gate_up with and without the fused SiLU·mul,
down), one random bf16 weight matrix per layer (28, streamed from memory as in a decode step, not from L2), timed
in one CUDA graph per variant as the engine's start-up choice times them (models/layers.py `_graph_ms`): cuBLAS
(+ the compiled SiLU·mul), the Triton GEMV (kernels/gemv.py) with its own tile choice, and the GEMV at each
(BLOCK_N, BLOCK_K, num_warps) of the grid (BLOCK_K up to K's next power of two). Prints ms per step (all layers)
and TB/s."""

from __future__ import annotations

import argparse
import itertools

import torch

from deepfleet.engine.benchmark import SHAPES
from deepfleet.kernels import gemv as gemv_module
from deepfleet.models import layers


def projections(shape: str) -> list[tuple[str, int, int, bool, bool]]:
    """(name, N rows of w, K, bias, silu_mul)"""
    cfg = SHAPES[shape]
    h, inner = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return [("qkv", h + 2 * kv, h, True, False), ("o", h, h, False, False), ("gate_up+silu", 2 * inner, h, False, True),
            ("gate_up", 2 * inner, h, False, False), ("down", h, inner, False, False)]


@torch.inference_mode()
def time_projection(shape: str, name: str, n: int, k: int, bias: bool, silu: bool, block_ns: list[int],
                    block_ks: list[int], warps: list[int]) -> None:
    num_layers = SHAPES[shape]["num_hidden_layers"]
    weights = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5,
                torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None)
               for _ in range(num_layers)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    nbytes = num_layers * n * k * 2

    def cublas():
        for w, b in weights:
            y = torch.nn.functional.linear(x, w, b)
            if silu:
                layers.silu_and_mul(y)

    def triton(tiles=None):
        for w, b in weights:
            gemv_module.gemv(x, w, b, silu_mul=silu, tiles=tiles)

    rows = [("cuBLAS", layers._graph_ms(cublas)), ("gemv, its own tiles", layers._graph_ms(triton))]
    for block_n, block_k, num_warps in itertools.product(block_ns, block_ks, warps):
        if block_k <= next_pow2(k):
            tiles = (block_n, block_k, num_warps)
            rows.append((f"gemv {block_n}x{block_k} w{num_warps}", layers._graph_ms(lambda t=tiles: triton(t))))
    best = min(ms for _, ms in rows)
    for label, ms in rows:
        mark = "  <- fastest" if ms == best else ""
        print(f"{shape:<5} {name:<13} {n:>6}x{k:<6} {label:<24} {ms:8.3f} ms {nbytes / ms / 1e9:6.2f} TB/s{mark}")


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def sweep(shape: str, block_ns: list[int], block_ks: list[int], warps: list[int]) -> None:
    layers.use_fused_kernels(True)  # the compiled SiLU·mul, as the engine's unfused path runs it
    for projection in projections(shape):
        time_projection(shape, *projection, block_ns, block_ks, warps)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["1.5b", "7b"])
    ap.add_argument("--block-n", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--block-k", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    for shape in args.shape:
        sweep(shape, args.block_n, args.block_k, args.warps)
