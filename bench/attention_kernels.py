"""Paged attention on the GPU: the Triton kernel (`deepfleet.kernels.paged_attention`, what models/attention.py
runs on CUDA) against the plain-PyTorch gather + SDPA path (models/attention.py's reference, the GPU path before the
kernel), measured in the same process.

    PYTHONPATH=runtime python3 bench/attention_kernels.py [--out bench/results.jsonl] [--commit SHA]
        [--e2e 7b --num-requests 512]

1. Correctness at realistic sizes (bf16 and float32; Qwen2-7B 28/4, 1.5B 12/2, Llama-8B 32/8 heads of 128, MLA
   576/512 with 16 and 128 heads): ragged decodes, fresh and chunked prefills, prefix hits, all in mixed batches.
   Both paths are compared with the reference run in float32 on upcast copies; the kernel passes when its error is
   within twice the bf16 reference path's (float32: within 1e-4 of the output scale). Then the kernel inside a
   CUDA graph, replayed after the lengths and block tables changed in place, against an eager call.
2. Decode attention time for one Qwen2-7B layer (28/4 heads, bf16, block 16) at batch 1/64/256 × context
   512/2k/8k and a long-tailed length mix, both paths captured in CUDA graphs (20 calls each), with the KV bytes
   each step must read and the rate that makes; the flash-decoding split swept at batch 1 / 8k.
3. Prefill: one fresh 8k prompt and a 2k chunk over 6k cached tokens (kernel vs SDPA flash), and MLA decode.
4. `--e2e SHAPE`: deepfleet.engine.benchmark's offline and batch-1 figures with the kernel, then with the
   reference path patched in (baseline), same process.
Every figure is printed and appended to --out as one JSON object per line."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time

import torch

from deepfleet.kernels.paged_attention import paged_attention as kernel
from deepfleet.models import attention
from deepfleet.models.attention import AttentionMetadata, reference_attention, write_kv

BS = 16


def make_batch(specs, heads, kv_heads, k_dim, v_dim, mla, dtype, shared_blocks=0, seed=0):
    """specs: [(query_len, seq_len)], decodes (query_len 1) first. Returns the tensors both paths need, with this
    step's new keys/values already written to their slots."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    needs = [math.ceil(s / BS) for _, s in specs]
    num_blocks = sum(needs) + 1
    order = torch.randperm(num_blocks - 1, device="cuda", generator=g).tolist()
    tables = []
    for i, n in enumerate(needs):
        table = tables[0][:shared_blocks] if i and shared_blocks else []
        while len(table) < n:
            table.append(order.pop())
        tables.append(table)
    width = 1 << max(0, (max(needs) - 1).bit_length())  # the engine's power-of-two width for the gather path
    scratch = num_blocks - 1

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32).to(dtype)

    k_cache = rand(num_blocks, BS, kv_heads, k_dim)
    v_cache = None if mla else rand(num_blocks, BS, kv_heads, v_dim)
    qlens = [q for q, _ in specs]
    t = sum(qlens)
    slots = [tables[i][p // BS] * BS + p % BS for i, (q, s) in enumerate(specs) for p in range(s - q, s)]
    dev = dict(device="cuda")
    meta = AttentionMetadata(
        num_decodes=sum(1 for q in qlens if q == 1),
        slot_mapping=torch.tensor(slots, dtype=torch.long, **dev),
        context_lens=torch.tensor([s for _, s in specs], dtype=torch.int32, **dev),
        block_tables=torch.tensor([tb + [scratch] * (width - len(tb)) for tb in tables], dtype=torch.int32, **dev),
        block_size=BS,
        prefills=[(q, s) for q, s in specs if q != 1],
        query_start_loc=torch.tensor([sum(qlens[:i]) for i in range(len(qlens) + 1)], dtype=torch.int32, **dev),
        max_query_len=max(qlens),
    )
    q, k, v = rand(t, heads, k_dim), rand(t, kv_heads, k_dim), None if mla else rand(t, kv_heads, v_dim)
    write_kv(k_cache, k, meta.slot_mapping)
    if v is not None:
        write_kv(v_cache, v, meta.slot_mapping)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, meta=meta, scale=k_dim**-0.5, v_dim=v_dim)


def run_kernel(b, num_splits=None):
    m = b["meta"]
    return kernel(b["q"], b["k_cache"], b["v_cache"], b["v_dim"], m.block_tables, m.context_lens, m.query_start_loc,
                  m.max_query_len, b["scale"], num_splits=num_splits)


def run_reference(b, dtype=None):
    def cast(x):
        return None if x is None or dtype is None else x.to(dtype)

    f = (lambda x: x) if dtype is None else cast
    meta = AttentionMetadata(**{k: getattr(b["meta"], k) for k in (
        "num_decodes", "slot_mapping", "context_lens", "block_tables", "block_size", "prefills", "query_start_loc",
        "max_query_len")})
    return reference_attention(f(b["q"]), f(b["k"]), f(b["v"]), f(b["k_cache"]), f(b["v_cache"]), meta, b["scale"],
                               b["v_dim"])


CHECKS = [  # name, heads, kv_heads, k_dim, v_dim, mla, dtype, specs, shared prefix blocks
    ("qwen7b decode 64 ragged", 28, 4, 128, 128, False, torch.bfloat16,
     [(1, n) for n in torch.randint(1, 4000, (64,), generator=torch.Generator().manual_seed(1)).tolist()], 0),
    ("qwen1.5b mixed", 12, 2, 128, 128, False, torch.bfloat16,
     [(1, 17), (1, 900), (1, 3001), (512, 512), (1000, 4000), (17, 300)], 0),
    ("llama8b mixed + prefix hit", 32, 8, 128, 128, False, torch.bfloat16,
     [(1, 64), (1, 1500), (300, 700), (45, 800)], 20),
    ("qwen7b mixed float32", 28, 4, 128, 128, False, torch.float32, [(1, 33), (1, 2000), (200, 1200), (77, 77)], 0),
    ("mla 16 heads mixed", 16, 1, 576, 512, True, torch.bfloat16, [(1, 100), (1, 3000), (128, 640)], 0),
    ("mla 128 heads decode", 128, 1, 576, 512, True, torch.bfloat16, [(1, n) for n in (5, 700, 2500, 4096)], 0),
]


def check() -> list[dict]:
    rows = []
    print(f"{'correctness case':<30}{'kernel err':>12}{'SDPA err':>12}  (max abs vs float32 reference)")
    for name, h, hkv, dk, dv, mla, dtype, specs, shared in CHECKS:
        b = make_batch(specs, h, hkv, dk, dv, mla, dtype, shared)
        truth = run_reference(b, torch.float32)
        k_err = (run_kernel(b).float() - truth).abs().max().item()
        r_err = (run_reference(b).float() - truth).abs().max().item()
        scale = truth.abs().max().item()
        ok = k_err <= 1e-4 * scale if dtype == torch.float32 else k_err <= 2 * r_err + 1e-3 * scale
        print(f"{name:<30}{k_err:>12.2e}{r_err:>12.2e}  {'ok' if ok else 'FAIL'}")
        rows.append(dict(workload=name, metric="max_abs_error", value=k_err, unit="abs", ok=ok, reference=r_err))
    # CUDA graph: capture, change lengths and tables in place, replay, compare with eager
    b = make_batch([(1, n) for n in (5, 100, 2000, 40)], 28, 4, 128, 128, False, torch.bfloat16)
    m = b["meta"]
    run_kernel(b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_kernel(b)
    m.context_lens.copy_(torch.tensor([9, 1, 700, 2048], dtype=torch.int32))
    m.block_tables.copy_(m.block_tables.flip(0))
    graph.replay()
    err = (out - run_kernel(b)).abs().max().item()
    ok = err == 0
    print(f"{'graph replay vs eager':<30}{err:>12.2e}{'':>12}  {'ok' if ok else 'FAIL'}")
    rows.append(dict(workload="cuda graph replay after in-place metadata change", metric="max_abs_diff", value=err,
                     unit="abs", ok=ok))
    return rows


def graph_time(fn, calls=20, replays=3) -> float:
    """Seconds per call of fn, captured `calls` times in one CUDA graph (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (calls * replays)


def mixed_lengths(n, seed) -> list[int]:
    """Long-tailed decode contexts: lognormal, median ~600, clipped to 32…8192 (ShareGPT-like chats)."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(n, generator=g) * 1.0 + math.log(600)).clamp(32, 8192).long().tolist()


def decode_bench() -> list[dict]:
    rows = []
    print(f"\n{'decode, Qwen2-7B layer bf16':<30}{'KV MB':>8}{'kernel us':>11}{'GB/s':>7}{'SDPA us':>10}{'GB/s':>7}"
          f"{'speed-up':>9}")
    for batch in (1, 64, 256):
        for ctx in (512, 2048, 8192, "mixed"):
            lens = mixed_lengths(batch, batch) if ctx == "mixed" else [ctx] * batch
            b = make_batch([(1, n) for n in lens], 28, 4, 128, 128, False, torch.bfloat16)
            kv_bytes = sum(lens) * 4 * 128 * 2 * 2
            tk = graph_time(lambda b=b: run_kernel(b))
            tr = graph_time(lambda b=b: run_reference(b))
            name = f"batch {batch} ctx {ctx}" + (f" (mean {sum(lens) // batch})" if ctx == "mixed" else "")
            print(f"{name:<30}{kv_bytes / 1e6:>8.1f}{tk * 1e6:>11.1f}{kv_bytes / tk / 1e9:>7.0f}{tr * 1e6:>10.1f}"
                  f"{kv_bytes / tr / 1e9:>7.0f}{tr / tk:>8.1f}x")
            for path, t in (("triton", tk), ("gather+sdpa", tr)):
                rows.append(dict(workload=f"decode attention {name}, {path}", metric="time", value=t * 1e6,
                                 unit="us", kv_bytes=kv_bytes))
            del b
    b = make_batch([(1, 8192)], 28, 4, 128, 128, False, torch.bfloat16)
    sweep = {s: graph_time(lambda s=s: run_kernel(b, s)) * 1e6 for s in (1, 8, 16, 32, 64, 128)}
    auto = graph_time(lambda: run_kernel(b)) * 1e6
    print("batch 1 ctx 8192 by num_splits: " + ", ".join(f"{s}: {t:.1f} us" for s, t in sweep.items())
          + f"; auto: {auto:.1f} us")
    rows += [dict(workload=f"decode attention batch 1 ctx 8192, triton num_splits={s}", metric="time", value=t,
                  unit="us") for s, t in sweep.items()]
    return rows


def prefill_bench() -> list[dict]:
    rows = []
    print(f"\n{'prefill / MLA':<36}{'kernel':>12}{'SDPA':>12}")
    for name, specs in (("fresh 8192 prompt", [(8192, 8192)]), ("2048 chunk over 6144 cached", [(2048, 8192)])):
        b = make_batch(specs, 28, 4, 128, 128, False, torch.bfloat16)
        q_len, seq_len = specs[0]
        flops = 4 * 28 * 128 * sum(seq_len - q_len + i + 1 for i in range(q_len))  # causal QK and PV
        tk, tr = graph_time(lambda b=b: run_kernel(b), calls=5), graph_time(lambda b=b: run_reference(b), calls=5)
        print(f"{name:<36}{flops / tk / 1e12:>8.0f} TF/s{flops / tr / 1e12:>8.0f} TF/s")
        for path, t in (("triton", tk), ("sdpa", tr)):
            rows.append(dict(workload=f"prefill attention {name}, Qwen2-7B layer bf16, {path}", metric="rate",
                             value=flops / t / 1e12, unit="TFLOP/s"))
    b = make_batch([(1, 2048)] * 64, 16, 1, 576, 512, True, torch.bfloat16)
    tk, tr = graph_time(lambda: run_kernel(b)), graph_time(lambda: run_reference(b))
    print(f"{'MLA decode 64 x 2048, 16 heads':<36}{tk * 1e6:>9.1f} us{tr * 1e6:>9.1f} us")
    for path, t in (("triton", tk), ("gather+sdpa", tr)):
        rows.append(dict(workload=f"MLA decode attention batch 64 ctx 2048 16 heads 576/512 bf16, {path}",
                         metric="time", value=t * 1e6, unit="us"))
    return rows


def e2e(shape: str, num_requests: int) -> list[dict]:
    from deepfleet.engine import benchmark

    rows = []
    for path in ("triton", "gather+sdpa"):
        if path == "gather+sdpa":
            attention._kernel_attention = reference_attention  # the previous GPU path, as the baseline
        print(f"\n--- engine, attention path: {path}")
        res = benchmark.run(shape, num_requests=num_requests, hf_baseline=False)["engine"]
        for metric, unit in (("batch1", "tok/s"), ("offline", "tok/s"), ("b1_step_ms", "ms")):
            rows.append(dict(shape=shape, workload=f"engine 128->128 x {num_requests}, attention {path}",
                             metric=metric, value=res[metric], unit=unit))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results.jsonl")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--e2e", nargs="*", default=[], help="shapes for the engine benchmark (1.5b, 7b)")
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args()
    base = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), commit=args.commit)
    rows = []
    t0 = time.perf_counter()
    if not args.skip_micro:
        rows += check()
        rows += decode_bench()
        rows += prefill_bench()
        print(f"\nmicro part: {time.perf_counter() - t0:.0f} s")
    for shape in args.e2e:
        rows += e2e(shape, args.num_requests)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps({**base, "shape": "attention op", **row}) + "\n")


if __name__ == "__main__":
    main()
