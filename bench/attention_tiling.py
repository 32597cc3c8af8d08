"""Decode tiling of the paged-attention kernel on the GPU: candidate `Tiling`s (keys per iteration, warps, pipeline
depth, split rule) against the kernel's own choice and against a baseline module (main's kernel, copied under
another name), all in one process, at the shapes the engine's decode graphs run.

    PYTHONPATH=runtime python3 bench/attention_tiling.py [--baseline MODULE] [--out results.jsonl] [--commit SHA]

1. Correctness, compiled on CUDA: every candidate and the baseline against the float32 reference
   (models/attention.reference_attention on upcast copies), output memory poisoned with NaN before each call;
   ragged decode batches with lengths 1 … 3k and shuffled block tables, batch 1 with the split, MLA 128 heads.
2. Time per layer: each shape's KV cache is `layers` distinct copies (different blocks), so that the KV read in
   one CUDA graph of calls over them exceeds the L2 as in a real decode step; the graph replays 5 times, the
   median replay over its calls is the figure; GB/s counts the K and V bytes the step must read.
Shapes: Qwen2-7B (28/4 heads) at 256 and 512 sequences of 138 tokens, 256 sequences of ShareGPT-like contexts
(`sharegpt_contexts`), batch 1 at 512 tokens for 7B and 1.5B (12/2 heads), DeepSeek-V3's absorbed MLA (128 heads
on one 576-wide latent head, values its first 512) at batch 1, 128 tokens."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import statistics

import torch

from deepfleet.kernels import paged_attention as pa
from deepfleet.models.attention import AttentionMetadata, reference_attention

BS = 16
DEV = "cuda"
DTYPE = torch.bfloat16
T = pa.Tiling
CANDIDATES = {  # name: Tiling; "auto" is the kernel's own choice
    "t16w2s3": T(16, 2, 3), "t16w2s5": T(16, 2, 5), "t32w2s3": T(32, 2, 3), "t32w4s2": T(32, 4, 2),
    "t32w4s5": T(32, 4, 5), "t32w2s5": T(32, 2, 5), "t64w4s3": T(64, 4, 3), "t64w4s5": T(64, 4, 5),
    "t128w8s2": T(128, 8, 2),
}
BATCH1_1_5B = ["t32w4s2", "t64w4s3"]
BROKEN: set[str] = set()  # candidates that failed the correctness check: not timed
BATCH1 = ["t16w2s3", "t32w4s2", "t32w4s5", "t64w4s3", "t64w4s5", "t128w8s2"]
SPLIT_RULES = {  # for the long-tailed batch: (splits, min tokens per split)
    "nosplit": (1, 0), "4x512": (4, 512), "8x256": (8, 256),
}


def sharegpt_contexts(n: int, seed: int) -> list[int]:
    """Decode contexts of a ShareGPT-like mix caught mid-generation: prompt lognormal (median 200, mean ~330,
    16 … 2,048) plus a uniform fraction of an output lognormal (median 180, mean ~250, 16 … 1,024); at most 3,072."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.exp(torch.randn(n, generator=g) * 0.9 + math.log(200)).clamp(16, 2048)
    output = torch.exp(torch.randn(n, generator=g) * 0.8 + math.log(180)).clamp(16, 1024)
    return (prompt + output * torch.rand(n, generator=g)).clamp(1, 3072).long().tolist()


def make(lens, heads, kv_heads, k_dim, v_dim, mla, layers, seed=0, width=None):
    """One cache holding `layers` copies of the batch's blocks; tables[l] points layer l at its copy, shuffled."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    needs = [math.ceil(n / BS) for n in lens]
    per_layer = sum(needs)
    width = width or max(needs)
    nb = per_layer * layers + 1
    dt = DTYPE
    k_cache = torch.randn(nb, BS, kv_heads, k_dim, device=DEV, generator=g, dtype=dt)
    v_cache = None if mla else torch.randn(nb, BS, kv_heads, v_dim, device=DEV, generator=g, dtype=dt)
    tables = []
    for layer in range(layers):
        order = (torch.randperm(per_layer, device=DEV, generator=g) + layer * per_layer).tolist()
        rows, i = [], 0
        for n in needs:
            rows.append(order[i : i + n] + [nb - 1] * (width - n))
            i += n
        tables.append(torch.tensor(rows, dtype=torch.int32, device=DEV))
    b = len(lens)
    q = torch.randn(b, heads, k_dim, device=DEV, generator=g, dtype=dt)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, v_dim=v_dim, tables=tables,
                lens=torch.tensor(lens, dtype=torch.int32, device=DEV),
                qsl=torch.arange(b + 1, dtype=torch.int32, device=DEV), scale=k_dim**-0.5,
                kv_bytes=sum(lens) * kv_heads * (k_dim if mla else k_dim + v_dim) * 2)  # MLA: values inside keys


def call(fn, b, layer=0, tiling=None, num_splits=None):
    kw = {} if tiling is None else {"tiling": tiling}
    return fn(b["q"], b["k_cache"], b["v_cache"], b["v_dim"], b["tables"][layer], b["lens"], b["qsl"], 1, b["scale"],
              num_splits=num_splits, **kw)


def reference(b, layer=0) -> torch.Tensor:
    n = b["q"].shape[0]
    meta = AttentionMetadata(num_decodes=n, slot_mapping=torch.empty(0, dtype=torch.long, device=DEV),
                             context_lens=b["lens"], block_tables=b["tables"][layer], block_size=BS, prefills=[],
                             query_start_loc=b["qsl"], max_query_len=1)
    def f(x):
        return None if x is None else x.float()

    return reference_attention(f(b["q"]), None, None, f(b["k_cache"]), f(b["v_cache"]), meta, b["scale"], b["v_dim"])


def poisoned(fn):
    """fn() with the allocator's next block of the output's size holding NaN (an unwritten element shows)."""
    def run(*a, **kw):
        probe = fn(*a, **kw)
        torch.full_like(probe, float("nan"))
        del probe
        return fn(*a, **kw)
    return run


def graph_us(fn, layers: int, reps: int) -> float:
    """Median over 5 replays of one graph of `reps` passes over the layers, per call, in microseconds."""
    for layer in range(layers):
        fn(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for layer in range(layers):
                fn(layer)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * layers))
    del graph
    return statistics.median(times)


QWEN7B, QWEN1_5B, MLA = (28, 4, 128, 128, False), (12, 2, 128, 128, False), (128, 1, 576, 512, True)
# name, lens, model, layers copies, passes per graph, candidates to time (None: all), split rules (None: auto)
SHAPES = [
    ("7b 256x138", [138] * 256, QWEN7B, 4, 3, None, SPLIT_RULES),  # the rules' early-exit cost on short contexts
    ("7b 512x138", [138] * 512, QWEN7B, 3, 3, None, None),
    ("7b 256 sharegpt", sharegpt_contexts(256, 7), QWEN7B, 3, 2, None, SPLIT_RULES),
    ("7b 1x512", [512], QWEN7B, 48, 2, BATCH1, None),
    ("1.5b 1x512", [512], QWEN1_5B, 160, 2, BATCH1_1_5B, None),
    ("mla 1x128", [128], MLA, 400, 1, [], {"s1": (1, 0), "s2": (2, 0), "s4": (4, 0)}),
    ("mla 1x4096", [4096], MLA, 16, 1, [], {"s8": (8, 0), "s32": (32, 0)}),
]
WIDTH_8K = 8192 // BS  # a captured decode graph's block table is as wide as the longest context it serves


def emit(row: dict) -> None:
    """One record to --out at once (a run stopped at its time limit keeps what it measured)."""
    with open(OUT["path"], "a") as f:
        f.write(json.dumps({**OUT["meta"], **row}) + "\n")


OUT: dict = {}
SUMMARY: list[str] = []


def correctness(base) -> None:
    cases = [("7b 64 ragged 1..3k", [1, 15, 16, 17, 138, 3000] + sharegpt_contexts(58, 3), QWEN7B, BATCH1),
             ("7b 256x138", [138] * 256, QWEN7B, list(CANDIDATES)), ("1.5b 1x512", [512], QWEN1_5B, BATCH1_1_5B),
             ("7b 1x3000", [3000], QWEN7B, BATCH1), ("mla 1x128", [128], MLA, []),
             ("mla 3 ragged", [5, 700, 2500], MLA, [])]
    print("correctness, max abs err / max |ref| (fp32 reference), columns: base auto [candidates of the row]")
    for case in cases:
        _check_case(base, *case)


def _check_case(base, name, lens, model, names) -> None:
    b = make(lens, *model, layers=1, seed=len(lens), width=WIDTH_8K)
    truth = reference(b)
    scale = truth.abs().max().item()
    runs = {"base": lambda: poisoned(call)(base, b), "auto": lambda: poisoned(call)(pa.paged_attention, b)}
    if not model[-1]:  # candidates unsplit at large batch, split 4 ways (at least 2 tiles each) otherwise
        split = (1, 1) if len(lens) >= 256 else (4, 2)
        runs.update({k: (lambda t=t: poisoned(call)(pa.paged_attention, b, tiling=T(
            t.tile_n, t.num_warps, t.num_stages, *split))) for k, t in CANDIDATES.items() if k in names})
    else:
        runs.update({f"s{s}": (lambda s=s: poisoned(call)(pa.paged_attention, b, num_splits=s)) for s in (1, 2, 4)})
    errs = {}
    for k, fn in runs.items():
        try:
            errs[k] = (fn().float() - truth).abs().max().item() / scale
        except Exception as exc:  # noqa: BLE001 -- a candidate that does not compile is reported, not fatal
            print(f"  {k}: {type(exc).__name__}: {str(exc)[:160]}")
            errs[k] = float("inf")
        if not math.isfinite(errs[k]):
            errs[k] = float("inf")
    bound = max(2 * errs["base"], 2e-2)
    ok = all(e <= bound for e in errs.values())
    BROKEN.update(k for k, e in errs.items() if e > bound)
    print(f"{name:<24}" + " ".join(f"{k}={e:.1e}" for k, e in errs.items()) + ("  ok" if ok else "  FAIL"))
    emit(dict(workload=f"correctness {name}", metric="max_rel_err", value=max(errs.values()), unit="ratio", ok=ok,
              errors=errs))


def timings(base) -> None:
    for shape in SHAPES:
        _time_shape(base, *shape)
        torch.cuda.empty_cache()


def _time_shape(base, name, lens, model, layers, reps, cands, rules) -> None:
    b = make(lens, *model, layers=layers, width=WIDTH_8K)
    kv = b["kv_bytes"]
    res = {}

    def timed(key, fn=pa.paged_attention, **kw):
        try:
            res[key] = graph_us(lambda layer: call(fn, b, layer, **kw), layers, reps)
        except Exception as exc:  # noqa: BLE001 -- reported, the sweep goes on
            print(f"  {name} {key}: {type(exc).__name__}: {str(exc)[:160]}")

    timed("base", base)
    timed("auto")
    for k, t in CANDIDATES.items():
        if (cands is None or k in cands) and k not in BROKEN:
            timed(k, tiling=t)
            if len(lens) == 1 and t.tile_n < 64:  # batch 1: small tiles also with splits of at least 64 keys
                timed(f"{k}/min64", tiling=T(t.tile_n, t.num_warps, t.num_stages, None, 64 // t.tile_n))
    for rule, (splits, min_tokens) in (rules or {}).items():
        if model[-1]:
            timed(rule, num_splits=splits)
            continue
        for k in ("t32w4s2", "t32w4s5", "t64w4s3", "t64w4s5", "t16w2s3"):
            t = CANDIDATES[k]
            timed(f"{k}/{rule}", tiling=T(t.tile_n, t.num_warps, t.num_stages, splits, max(1, min_tokens // t.tile_n)))
    mean = sum(lens) / len(lens)
    print(f"\n{name} (mean ctx {mean:.0f}, KV {kv / 1e6:.1f} MB per layer)")
    for k, us in sorted(res.items(), key=lambda item: item[1]):
        print(f"   {k:<22}{us:>8.1f} us {kv / us / 1e3:>6.0f} GB/s  x{res['base'] / us:.2f} vs base")
        emit(dict(workload=f"decode attention {name} (mean ctx {mean:.0f}), {k}", metric="time", value=round(us, 2),
                  unit="us", kv_bytes=kv, gb_s=round(kv / us / 1e3)))
    best = min((k for k in res if k != "base"), key=res.get)
    SUMMARY.append(f"{name:<18}{mean:>6.0f}{res['base']:>9.1f}{kv / res['base'] / 1e3:>7.0f}{res['auto']:>9.1f}"
                   f"{kv / res['auto'] / 1e3:>7.0f}  {best:<20}{res[best]:>8.1f}{kv / res[best] / 1e3:>7.0f}")


def mixed_step(base) -> None:
    """A mixed step through the prefill launch (not the decode tiling): 64 decodes of 500 tokens, a 512-token chunk
    over 1,024 cached, a fresh 300-token prompt; the kernel's default vs the baseline."""
    from attention_kernels import make_batch

    b = make_batch([(1, 500)] * 64 + [(512, 1536), (300, 300)], *QWEN7B[:4], False, DTYPE)
    m = b["meta"]

    def run(fn):
        return fn(b["q"], b["k_cache"], b["v_cache"], b["v_dim"], m.block_tables, m.context_lens, m.query_start_loc,
                  m.max_query_len, b["scale"])

    err = (run(pa.paged_attention).float() - run(base).float()).abs().max().item()
    t_new, t_base = (graph_us(lambda layer, f=f: run(f), 1, 10) for f in (pa.paged_attention, base))
    print(f"\nmixed step 64 decodes + 2 prefills: new {t_new:.1f} us, base {t_base:.1f} us, max |new - base| {err:.1e}")
    for k, us in (("auto", t_new), ("base", t_base)):
        emit(dict(workload=f"attention mixed step 7b (64 decodes x 500, 512 over 1024, 300 fresh), {k}",
                  metric="time", value=round(us, 2), unit="us", new_vs_base_max_abs=err))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", default="deepfleet.kernels.paged_attention", help="module with paged_attention")
    ap.add_argument("--out", default="bench/results.jsonl")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    base = importlib.import_module(args.baseline).paged_attention
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(), commit=args.commit, shape="attention op bf16 block 16")
    OUT.update(path=args.out, meta={**meta, "baseline": args.baseline})
    if not args.skip_check:
        from attention_kernels import check  # prefill, chunks, prefix hits, MLA, graph replay: kernel's default

        check()
        correctness(base)
    timings(base)
    print(f"\n{'shape':<18}{'ctx':>6}{'base us':>9}{'GB/s':>7}{'auto us':>9}{'GB/s':>7}  {'best':<20}{'us':>8}"
          f"{'GB/s':>7}")
    print("\n".join(SUMMARY))
    mixed_step(base)


if __name__ == "__main__":
    main()
