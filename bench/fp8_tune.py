"""Tile tuning of the block-FP8 GEMM (runtime/deepfleet/kernels/fp8_gemm.py) on the GPU at hand, the way vLLM and
SGLang tune their block-FP8 Triton GEMM: per weight shape (N, K) and row count M, every candidate tile choice is
checked against the dequantized reference and timed (CUDA-graph replays over enough distinct weight copies that
L2 holds none of them), the fastest kept. bf16 F.linear (cuBLAS) on the same shapes is timed in the same run as
the baseline. Writes the table the kernels read (kernels/fp8_configs/<device>.json: --configs-dir, default the
package's own) and one JSON record per shape and M (bench/results.jsonl format) to --out.

  python bench/fp8_tune.py --out tune.jsonl [--configs-dir DIR] [--commit SHA] [--shapes 7b v3] [--rows 64 256]

Candidates: the Triton kernels' tile choices and, where it takes the call, torch._scaled_mm's cuBLASLt block
scaling ("scaled_mm"). Besides the fastest per (N, K, M), the records hold the fastest Triton choice and the
scaled_mm time on their own, so the two large-row paths are compared in the same run. --rows re-tunes only those
of each shape set's row counts; the table keeps the other rows' measured entries.

Compilation is the slow part (K and the loop counts are compile-time constants), so worker processes first
compile every candidate into Triton's on-disk cache in parallel; the timing process then only loads them."""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fp8_kernels import graph_time_ms  # bench/ is the script's own directory

from deepfleet.kernels import fp8_gemm
from deepfleet.quant.fp8 import dequantize, quantize

BLOCK = (128, 128)
SHAPES = {  # (N, K) of each FP8 projection
    "7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)},
    "1.5b": {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)},
    "v3": {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "o": (7168, 16384),
           "dense gate_up": (36864, 7168), "dense down": (7168, 18432), "shared gate_up": (4096, 7168),
           "shared down": (7168, 2048)},
}
# 7B: decode batches up to 1,024 rows (MAX_NUM_SEQS_GPU_CAP) and prefill passes up to 4,096 tokens
ROWS = {"7b": (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), "1.5b": (1, 4, 16, 32, 64, 128, 256, 512, 1024),
        "v3": (1, 64, 256)}
L2_FREE_BYTES = 320 << 20  # weight copies per timed graph: at least this many bytes, so L2 (50 MB) holds none


def candidates(m: int, n: int, k: int, sms: int, x: torch.Tensor) -> list[dict]:
    out = []
    if m == 1:  # the one-row W8A16 kernel: rows per program x K step, warps, K splits
        for bn, bk, warps in ((2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 512, 4), (8, 256, 4), (16, 256, 8)):
            for split in (1, 2, 4):
                out.append(dict(kernel="gemv", BN=bn, BK=bk, SPLIT=split, num_warps=warps))
    if m <= fp8_gemm.STREAMING_MAX_ROWS:
        for bn, stages in ((32, 4), (64, 4), (128, 3)):
            auto = fp8_gemm.auto_split(-(-n // bn), -(-k // 128), sms)
            for split in sorted({1, auto}):
                out.append(dict(kernel="stream", BN=bn, SPLIT=split, num_warps=4, num_stages=stages))
    tiles = [(16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4)] if m <= 32 else []
    if 16 < m <= 128:
        tiles += [(64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 4)]
    if m > 64:
        tiles += [(64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4),
                  (128, 256, 8, 3)]
    for bm, bn, warps, stages in tiles:
        auto = fp8_gemm.auto_split(-(-m // bm) * -(-n // bn), -(-k // 128), sms)
        for split in sorted({1, auto}):
            out.append(dict(kernel="w8a8", BM=bm, BN=bn, GROUP_M=8, SPLIT=split, num_warps=warps,
                            num_stages=stages))
    if fp8_gemm.scaled_mm_fits(m, n, k, BLOCK, x):
        out.append(dict(kernel="scaled_mm"))
    return out


def jobs(shape_sets, sms, rows):
    for name in shape_sets:
        for proj, (n, k) in SHAPES[name].items():
            for m in ROWS[name]:
                if rows and m not in rows:
                    continue
                x = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")
                for cfg in candidates(m, n, k, sms, x):
                    if cfg["kernel"] != "scaled_mm":  # cuBLASLt: nothing to compile
                        yield name, proj, n, k, m, cfg


def compile_key(job) -> tuple:
    """What makes two candidates one compiled kernel (the constexprs)."""
    _, _, n, k, m, cfg = job
    k_tiles = -(-k // 128)
    per_split = -(-k_tiles // max(1, min(cfg["SPLIT"], k_tiles)))
    splits = -(-k_tiles // per_split)
    tiles = tuple(sorted((key, v) for key, v in cfg.items() if key != "SPLIT"))
    if cfg["kernel"] == "gemv":  # K steps of BK, not of the scale block
        k_steps = -(-k // cfg["BK"])
        per_split = -(-k_steps // max(1, min(cfg["SPLIT"], k_steps)))
        return "gemv", k, per_split, -(-k_steps // per_split), tiles
    if cfg["kernel"] == "w8a8":
        return "w8a8", k, per_split, splits, tiles
    return "stream", k, per_split, splits, max(1 << (m - 1).bit_length(), 16), tiles


def _compile(batch):
    """Worker: run each candidate once on uninitialised tensors of its shape (fills Triton's disk cache)."""
    torch.cuda.set_device(0)
    failed = 0
    for _, _, n, k, m, cfg in batch:
        try:
            w = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="cuda")
            s = torch.ones(-(-n // 128), -(-k // 128), device="cuda")
            fp8_gemm.fp8_matmul(torch.zeros(m, k, dtype=torch.bfloat16, device="cuda"), w, s, BLOCK, config=cfg)
        except Exception:  # the timing pass reports it
            failed += 1
    torch.cuda.synchronize()
    return failed


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs-dir", type=Path, default=fp8_gemm.CONFIG_DIR)
    ap.add_argument("--commit", default="")
    ap.add_argument("--shapes", nargs="+", default=["7b", "v3"], choices=sorted(SHAPES))
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--rows", type=int, nargs="+", default=[], help="tune only these row counts (default: all)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    device_name = torch.cuda.get_device_name()
    distinct = {}
    for job in jobs(a.shapes, sms, a.rows):
        distinct.setdefault(compile_key(job), job)
    todo = list(distinct.values())
    t0 = time.time()
    with mp.get_context("spawn").Pool(a.workers) as pool:
        failed = sum(pool.map(_compile, [todo[i::a.workers] for i in range(a.workers)]))
    print(f"compiled {len(todo)} kernels in {a.workers} processes: {time.time() - t0:.1f} s ({failed} failed)",
          flush=True)

    a.configs_dir.mkdir(parents=True, exist_ok=True)
    path = a.configs_dir / ("".join(c if c.isalnum() else "_" for c in device_name) + ".json")
    old = json.loads(path.read_text())["configs"] if path.is_file() else {}
    records, table = [], {}
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{'shape':<22}{'M':>5}{'bf16 us':>9}{'fp8 us':>9}{'x':>6}{'err':>8}  best tiles", flush=True)
    for name in a.shapes:
        for proj, (n, k) in SHAPES[name].items():
            copies = max(1, min(16, -(-L2_FREE_BYTES // (n * k))))
            ws = [quantize(torch.randn(n, k, device=dev, generator=gen) / k**0.5, BLOCK) for _ in range(copies)]
            ref_w = dequantize(*ws[0], BLOCK, torch.bfloat16)
            bf = [dequantize(*w, BLOCK, torch.bfloat16) for w in ws]
            by_rows = table.setdefault(f"N={n},K={k}", {})
            for m in ROWS[name]:
                if a.rows and m not in a.rows:
                    continue
                x = torch.randn(m, k, device=dev, generator=gen, dtype=torch.bfloat16)
                want = F.linear(x, ref_w)
                want_a8 = F.linear(dequantize(*quantize(x, (1, 128)), (1, 128), torch.bfloat16), ref_w)
                t_bf = 1e3 * graph_time_ms(lambda x=x, bf=bf: [F.linear(x, w) for w in bf]) / copies
                best, fastest = None, {}  # fastest: per path family (Triton, cuBLASLt)
                for cfg in candidates(m, n, k, sms, x):
                    try:
                        err = rel(fp8_gemm.fp8_matmul(x, *ws[0], BLOCK, config=cfg),
                                  want if cfg["kernel"] in ("stream", "gemv") else want_a8)
                        if not err < 3e-2:
                            print(f"  rejected (error {err:.3g}): {cfg}", flush=True)
                            continue
                        t = 1e3 * graph_time_ms(lambda x=x, cfg=cfg, ws=ws: [
                            fp8_gemm.fp8_matmul(x, *w, BLOCK, config=cfg) for w in ws]) / copies
                    except Exception as e:  # a tile choice that does not compile or run here
                        print(f"  failed: {cfg}: {e!r:.200}", flush=True)
                        continue
                    family = "scaled_mm" if cfg["kernel"] == "scaled_mm" else "triton"
                    fastest[family] = min(fastest.get(family, t), t)
                    if best is None or t < best[0]:
                        best = (t, cfg, err)
                if best is None:
                    continue
                t8, cfg, err = best
                by_rows[str(m)] = cfg
                tiles = " ".join(f"{key}={v}" for key, v in cfg.items())
                others = " ".join(f"{f}={v:.1f}" for f, v in sorted(fastest.items()))
                print(f"{name + ' ' + proj:<22}{m:>5}{t_bf:>9.1f}{t8:>9.1f}{t_bf / t8:>6.2f}{err:>8.4f}  {tiles}"
                      f"  [{others}]", flush=True)
                shape = f"{name} {proj} N={n} K={k} M={m}"
                for workload, metric, value, unit in (
                        ("bf16 F.linear (baseline)", "us", t_bf, "us"),
                        ("fp8_matmul, tuned tiles", "us", t8, "us"),
                        ("fp8 vs bf16", "speedup", t_bf / t8, "x"),
                        ("fp8 weight bytes / time", "bandwidth", n * k / t8 / 1e3, "GB/s"),
                        *((f"fp8 fastest {family} path", "us", v, "us") for family, v in sorted(fastest.items()))):
                    records.append(dict(shape=shape, workload=workload, metric=metric, value=round(value, 4),
                                        unit=unit))
            del ws, bf, ref_w
            torch.cuda.empty_cache()
            write(a, path, old, table, records)  # after each shape: a cut-off run keeps what it measured
    print(f"wrote {path} ({sum(map(len, table.values()))} entries), {time.time() - t0:.1f} s", flush=True)


def write(a, path: Path, old: dict, table: dict, records: list[dict]) -> None:
    """The table (merged per row count into `old`, the one there before this run) and the records, so far."""
    doc = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(), "commit": a.commit,
           "tool": "bench/fp8_tune.py",
           "configs": {shape: {**old.get(shape, {}), **table.get(shape, {})} for shape in {*old, *table}}}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    with open(a.out, "w") as f:
        for r in records:
            f.write(json.dumps({"date": doc["date"], "device": doc["device"], "commit": a.commit, **r}) + "\n")


if __name__ == "__main__":
    main()
