"""Batch-1 GEMV tiles against cuBLAS (GPU): `python bench/gemv_sweep.py --shape 1.5b 7b [--json out.json]`.

For each projection of the R1-Distill-Qwen shapes (QKV with bias, O, gate_up with and without the fused SiLU·mul
epilogue, down), one random bf16 weight matrix per layer (28, streamed from
memory as in a decode step, not from L2), timed in one CUDA graph per variant as the engine's start-up choice times
them (models/layers.py `_graph_ms`): cuBLAS (+ the SiLU·mul kernel where the variant fuses it), then the Triton
GEMV (kernels/gemv.py) at each (BLOCK_N, BLOCK_K, num_warps, SPLIT_K) of the grid. The kernels are compiled first
in a pool of processes (Triton's disk cache), so the timing process only loads them. Prints cuBLAS and the fastest
tiles per projection, ms per step (all layers) and TB/s of weight read."""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os

import torch

from deepfleet.engine.benchmark import SHAPES
from deepfleet.kernels import gemv as gemv_module
from deepfleet.models import layers

# (BLOCK_N, BLOCK_K) pairs: 16-byte bf16 vectors along K, 2-16 rows per program
TILE_SHAPES = [(1, 2048), (2, 1024), (2, 2048), (4, 256), (4, 512), (4, 1024), (8, 256), (8, 512), (16, 128),
               (16, 256), (32, 128)]
WARPS = [4, 8]


def projections(shape: str) -> list[tuple[str, int, int, bool, str, list[int]]]:
    """(name, N rows of w, K, bias, fusion, SPLIT_K values to try)"""
    cfg = SHAPES[shape]
    h, inner = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return [("qkv", h + 2 * kv, h, True, "", [1, 2]), ("o", h, h, False, "", [1, 2, 4]),
            ("gate_up", 2 * inner, h, False, "", [1]), ("gate_up+silu", 2 * inner, h, False, "silu_mul", [1]),
            ("down", h, inner, False, "", [1, 2, 4, 8])]


def variants(splits: list[int]) -> list[tuple[int, int, int, int]]:
    return [(bn, bk, nw, s) for (bn, bk), nw, s in itertools.product(TILE_SHAPES, WARPS, splits)]


def _compile(job: tuple[tuple[int, int, int, int], bool, str]) -> None:
    tiles, bias, fusion = job
    k = 2 * tiles[1] * tiles[3]  # (several tiles per split: the loop as compiled for the real K)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, device="cuda", dtype=torch.bfloat16) if bias else None
    gemv_module.gemv(x, w, b, silu_mul=fusion == "silu_mul", tiles=tiles)
    torch.cuda.synchronize()


def compile_all(shapes: list[str]) -> None:
    jobs = {(tiles, bias, fusion) for shape in shapes for _, _, _, bias, fusion, splits in projections(shape)
            for tiles in variants(splits)}
    ctx = torch.multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(16, os.cpu_count() or 1), mp_context=ctx) as pool:
        list(pool.map(_compile, sorted(jobs)))


@torch.inference_mode()
def time_projection(shape: str, name: str, n: int, k: int, bias: bool, fusion: str, splits: list[int]) -> list:
    num_layers = SHAPES[shape]["num_hidden_layers"]
    weights = [(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5,
                torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None)
               for _ in range(num_layers)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    nbytes = num_layers * n * k * 2

    def cublas():
        for w, b in weights:
            if fusion == "silu_mul":
                layers.silu_and_mul(torch.nn.functional.linear(x, w, b))
            else:
                torch.nn.functional.linear(x, w, b)

    def triton(tiles):
        for w, b in weights:
            gemv_module.gemv(x, w, b, silu_mul=fusion == "silu_mul", tiles=tiles)

    rows = [("cuBLAS", None, layers._graph_ms(cublas))]
    rows += [("gemv", tiles, layers._graph_ms(lambda t=tiles: triton(t))) for tiles in variants(splits)]
    rows.sort(key=lambda row: row[2])
    shown = [row for row in rows if row[0] == "cuBLAS"] + [row for row in rows if row[0] != "cuBLAS"][:4]
    for label, tiles, ms in shown:
        print(f"{shape:<5} {name:<13} {n:>6}x{k:<6} {label:<6} {str(tiles or ''):<20} {ms:8.4f} ms "
              f"{nbytes / ms / 1e9:5.2f} TB/s{'  <- fastest' if ms == rows[0][2] else ''}", flush=True)
    return [{"shape": shape, "projection": name, "n": n, "k": k, "impl": label, "tiles": tiles, "ms": ms,
             "tb_s": nbytes / ms / 1e9} for label, tiles, ms in rows]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["1.5b", "7b"])
    ap.add_argument("--json", help="write every timing here")
    args = ap.parse_args()
    compile_all(args.shape)
    results = []
    for shape in args.shape:
        for projection in projections(shape):
            results += time_projection(shape, *projection)
            torch.cuda.empty_cache()  # (this projection's weights)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
