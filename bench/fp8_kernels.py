"""FP8 kernels and the fused MoE on a GPU (issue 14): correctness against the plain-PyTorch references, then timings
with their same-run baselines. Prints a table and writes JSON records (bench/results.jsonl format) to --out.

  python bench/fp8_kernels.py --out results.jsonl [--commit SHA]

1. correctness: fp8_matmul (each kernel), fused_experts (bf16 and FP8) vs reference.
   dispatch: the path each row count of two 7B projections takes, its error, CUDA graph replay == eager.
   padded: the scaled_mm path at row counts that are not multiples of 4, against the reference, graph == eager.
2. 7B-shaped projections (R1-Distill-Qwen-7B: qkv, o, gate_up, down) per layer, FP8 vs bf16 F.linear, batch
   1 / 64 / 256 / 1,024 / 4,096, timed as CUDA-graph replays over 8 layers of distinct weights (more than L2 holds).
3. MLA decode at V3 width: kernels.mla_decode vs the generic paged kernel.
4. a tiny FP8 DeepSeek-V3 through the engine with CUDA graphs vs eager (greedy tokens equal), float32 and bf16.
5. V3 MoE at batch 256 (256 experts, 8 per token, H 7168, I 2048): fused FP8 and bf16 vs the per-expert loop.
6. V3-shaped decoder layers at full width, random FP8 weights made on the GPU: one MoE layer's decode time at
   batch 1 / 64 / 256 from the difference of 6- and 2-layer models (1 dense + 5 / 1 MoE), against the bytes it reads;
   batch 1 also after the engine's start-up choices (models/layers.py choose_gemv), which its batch-1 graph runs.
7. v3profile: the 2-layer model's batch-1 decode step, GPU time per kernel (torch.profiler) against its graph time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepfleet.kernels import fp8_gemm
from deepfleet.kernels.fp8_gemm import config_for, fp8_matmul
from deepfleet.kernels.fused_moe import fused_experts
from deepfleet.models.deepseek_v3 import experts_reference
from deepfleet.quant.fp8 import dequantize, quantize

DEV = torch.device("cuda")
BLOCK = (128, 128)
RECORDS: list[dict] = []


def record(shape, workload, metric, value, unit):
    RECORDS.append(dict(shape=shape, workload=workload, metric=metric, value=round(value, 4), unit=unit))
    print(f"{shape:40s} {workload:44s} {metric:22s} {value:12.4f} {unit}", flush=True)


def graph_time_ms(fn, reps: int = 20) -> float:
    """Mean ms of fn() captured once in a CUDA graph and replayed."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def rand_fp8(*shape):
    return torch.randn(*shape, device=DEV).clamp(-8, 8).to(torch.float8_e4m3fn)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def correctness():
    g = torch.Generator(device=DEV).manual_seed(0)
    n, k = 4096, 3584
    w, s = quantize(torch.randn(n, k, device=DEV, generator=g) / k**0.5, BLOCK)
    wd = dequantize(w, s, BLOCK, torch.bfloat16)
    for m in (1, 4, 16, 64, 256):
        x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
        kernel = config_for(x, n, BLOCK)["kernel"]
        xq = dequantize(*quantize(x, (1, 128)), (1, 128), torch.bfloat16) if kernel not in ("stream", "gemv") else x
        record(f"fp8_matmul {m}x{n}x{k} ({kernel})", "vs dequantized reference (bf16)", "max_rel_err",
               rel(fp8_matmul(x, w, s, BLOCK), F.linear(xq, wd)), "ratio")
    e, h, inner = 16, 1024, 512
    w13 = torch.randn(e, 2 * inner, h, device=DEV, generator=g) / h**0.5
    w2 = torch.randn(e, h, inner, device=DEV, generator=g) / inner**0.5
    q13, s13 = map(torch.stack, zip(*(quantize(x, BLOCK) for x in w13), strict=True))
    q2, s2 = map(torch.stack, zip(*(quantize(x, BLOCK) for x in w2), strict=True))
    d13, d2 = dequantize(q13, s13, BLOCK, torch.bfloat16), dequantize(q2, s2, BLOCK, torch.bfloat16)
    for t in (3, 200):
        x = torch.randn(t, h, device=DEV, generator=g, dtype=torch.bfloat16)
        ids = torch.rand(t, e, device=DEV, generator=g).topk(4, dim=-1)[1]
        wts = torch.rand(t, 4, device=DEV, generator=g)
        b13, b2 = w13.bfloat16(), w2.bfloat16()
        record(f"fused_experts bf16 T={t} E={e} k=4", "vs per-expert loop", "max_rel_err",
               rel(fused_experts(x, b13, b2, ids, wts), experts_reference(x, b13, b2, ids, wts)), "ratio")
        record(f"fused_experts fp8 T={t} E={e} k=4", "vs per-expert loop (dequantized)", "max_rel_err",
               rel(fused_experts(x, q13, q2, ids, wts, s13, s2, BLOCK), experts_reference(x, d13, d2, ids, wts)),
               "ratio")


def dispatch():
    """Which path each row count of the 7B projections gets (the table), its error against the reference, and the
    same call captured in a CUDA graph and replayed (as the engine's graphs run it): equal to eager. Then the row
    counts torch._scaled_mm's block scaling takes, called directly (the dispatcher sends it multiples of 4)."""
    g = torch.Generator(device=DEV).manual_seed(1)
    for proj, (n, k) in {"qkv": (4608, 3584), "down": (3584, 18944)}.items():
        w, s = quantize(torch.randn(n, k, device=DEV, generator=g) / k**0.5, BLOCK)
        wd = dequantize(w, s, BLOCK, torch.bfloat16)
        bias = torch.randn(n, device=DEV, generator=g, dtype=torch.bfloat16) if proj == "qkv" else None
        for m in (1, 3, 64, 66, 256, 1024, 4096):
            x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
            kernel = config_for(x, n, BLOCK)["kernel"]
            xq = dequantize(*quantize(x, (1, 128)), (1, 128), torch.bfloat16) if kernel not in ("stream", "gemv") else x
            eager = fp8_matmul(x, w, s, BLOCK, bias)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = fp8_matmul(x, w, s, BLOCK, bias)
            graph.replay()
            torch.cuda.synchronize()
            shape = f"7B {proj} {m}x{n}x{k} ({kernel})"
            record(shape, "vs dequantized reference (bf16)", "max_rel_err", rel(eager, F.linear(xq, wd, bias)),
                   "ratio")
            record(shape, "CUDA graph replay vs eager", "max_abs_diff", (captured - eager).abs().max().item(), "abs")


def padded():
    """The scaled_mm path at row counts that are not multiples of 4 (cuBLASLt refuses those: padded to four),
    against the reference, eager and replayed from a CUDA graph."""
    g = torch.Generator(device=DEV).manual_seed(2)
    n, k = 4608, 3584
    w, s = quantize(torch.randn(n, k, device=DEV, generator=g) / k**0.5, BLOCK)
    wd = dequantize(w, s, BLOCK, torch.bfloat16)
    bias = torch.randn(n, device=DEV, generator=g, dtype=torch.bfloat16)
    for m in (1, 2, 3, 5, 6, 8, 65, 66, 68, 2049):  # rows not in fours: padded to the next four
        x = torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16)
        xq = dequantize(*quantize(x, (1, 128)), (1, 128), torch.bfloat16)
        eager = fp8_matmul(x, w, s, BLOCK, bias, config=dict(kernel="scaled_mm"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fp8_matmul(x, w, s, BLOCK, bias, config=dict(kernel="scaled_mm"))
        graph.replay()
        torch.cuda.synchronize()
        record(f"scaled_mm path {m}x{n}x{k}", "vs dequantized reference (bf16)", "max_rel_err",
               rel(eager, F.linear(xq, wd, bias)), "ratio")
        record(f"scaled_mm path {m}x{n}x{k}", "CUDA graph replay vs eager", "max_abs_diff",
               (captured - eager).abs().max().item(), "abs")


def engine_graphs():
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
    from deepfleet.engine.sampling_params import SamplingParams
    from deepfleet.models.tiny import make_tiny_model

    d = make_tiny_model(tempfile.mkdtemp() + "/ds8", "deepseek_v3", fp8=True, shards=2)
    for dtype in ("float32", "bfloat16"):  # float32: rounding cannot hide a graph bug behind greedy divergence
        _graphs_vs_eager(d, dtype, EngineConfig, LLMEngine, SamplingParams)


def _graphs_vs_eager(d, dtype, EngineConfig, LLMEngine, SamplingParams):
    outs = {}
    for eager in (True, False):
        eng = LLMEngine(EngineConfig(model=str(d), dtype=dtype, device="cuda", enforce_eager=eager,
                                     max_num_seqs=8, num_kv_blocks=256))
        for i in range(4):
            eng.add_request(str(i), [5 + i, 17, 99, 3, 250 + i],
                            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
        outs[eager] = [done[str(i)] for i in range(4)]
        if not eager:
            record(f"tiny V3 FP8 engine {dtype}", "CUDA graphs captured (decode)", "graphs",
                   len(eng.runner.graphs), "count")
    same = sum(a == b for a, b in zip(outs[True], outs[False], strict=True))
    record(f"tiny V3 FP8 engine {dtype}", "greedy tokens graphs == eager", "sequences_equal", same / 4, "ratio")


def dense_7b():
    shapes = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
    layers = 8
    fp8_w = [{k: (rand_fp8(n, kk), torch.full((math.ceil(n / 128), math.ceil(kk / 128)), 0.01, device=DEV))
              for k, (n, kk) in shapes.items()} for _ in range(layers)]
    bf_w = [{k: torch.randn(n, kk, device=DEV, dtype=torch.bfloat16) * 0.02 for k, (n, kk) in shapes.items()}
            for _ in range(layers)]
    fp8_bytes = sum(n * kk for n, kk in shapes.values())
    for m in (1, 64, 256, 1024, 4096):
        xs = {k: torch.randn(m, kk, device=DEV, dtype=torch.bfloat16) for k, (_, kk) in shapes.items()}
        t_bf = graph_time_ms(lambda xs=xs: [F.linear(xs[k], lw[k]) for lw in bf_w for k in shapes]) / layers
        t_8 = graph_time_ms(lambda xs=xs: [fp8_matmul(xs[k], *lw[k], BLOCK) for lw in fp8_w for k in shapes]) / layers
        shape = f"7B layer projections batch {m}"
        record(shape, "bf16 F.linear (baseline)", "ms_per_layer", t_bf, "ms")
        record(shape, "fp8 block-scaled (fp8_matmul)", "ms_per_layer", t_8, "ms")
        record(shape, "fp8 vs bf16", "speedup", t_bf / t_8, "x")
        record(shape, "fp8 weight bytes / time", "bandwidth", fp8_bytes / t_8 / 1e6, "GB/s")
        t_q = graph_time_ms(lambda xs=xs: [fp8_gemm.quantize_activations(xs[k], 128) for _ in fp8_w for k in shapes])
        record(shape, "of which 1x128 activation quantization (4 launches)", "ms_per_layer", t_q / layers, "ms")


def moe_256():
    e, k, h, inner, t = 256, 8, 7168, 2048, 256
    q13 = rand_fp8(e, 2 * inner, h)
    q2 = rand_fp8(e, h, inner)
    s13 = torch.full((e, 2 * inner // 128, h // 128), 0.01, device=DEV)
    s2 = torch.full((e, h // 128, inner // 128), 0.01, device=DEV)
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    ids = torch.rand(t, e, device=DEV).topk(k, dim=-1)[1]
    wts = torch.rand(t, k, device=DEV)
    t8 = graph_time_ms(lambda: fused_experts(x, q13, q2, ids, wts, s13, s2, BLOCK), reps=10)  # noqa: F821
    b13, b2 = q13.to(torch.bfloat16) * 0.01, q2.to(torch.bfloat16) * 0.01
    del q13, q2
    tb = graph_time_ms(lambda: fused_experts(x, b13, b2, ids, wts), reps=10)  # noqa: F821 (deleted only after)
    experts_reference(x, b13, b2, ids, wts)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        experts_reference(x, b13, b2, ids, wts)
    torch.cuda.synchronize()
    tl = (time.perf_counter() - t0) / 3 * 1e3
    shape = "V3 MoE E=256 k=8 H=7168 I=2048 T=256"
    record(shape, "per-expert loop bf16 (old, baseline)", "ms", tl, "ms")
    record(shape, "fused bf16", "ms", tb, "ms")
    record(shape, "fused fp8", "ms", t8, "ms")
    record(shape, "fused fp8 vs old loop", "speedup", tl / t8, "x")
    record(shape, "fused bf16 vs old loop", "speedup", tl / tb, "x")
    del b13, b2
    torch.cuda.empty_cache()


def mla():
    """Absorbed MLA decode at V3 width (128 heads, latent 512 + rope 64, block 16): kernels.mla_decode vs the generic
    paged kernel, both over a block table as wide as an 8k context (what a captured decode graph holds), on shuffled
    blocks. The result sets deepseek_v3.MLA_DECODE_MIN_BATCH (by hand)."""
    from deepfleet.kernels.mla_decode import mla_decode
    from deepfleet.kernels.paged_attention import paged_attention
    heads, lat, rope, bs, width = 128, 512, 64, 16, 8192 // 16
    scale = 192**-0.5
    for b, ctx in ((1, 512), (1, 4096), (8, 2048), (64, 512), (64, 2048), (256, 512)):
        blocks = b * width + 1
        cache = torch.randn(blocks, bs, 1, lat + rope, device=DEV, dtype=torch.bfloat16)
        tables = torch.randperm(b * width, device=DEV).view(b, width).to(torch.int32)
        lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
        q = torch.randn(b, heads, lat + rope, device=DEV, dtype=torch.bfloat16)
        qsl = torch.arange(b + 1, device=DEV, dtype=torch.int32)
        generic = lambda q=q, c=cache, t=tables, n=lens, s=qsl: paged_attention(q, c, None, lat, t, n, s, 1, scale)  # noqa: E731
        mine = lambda q=q, c=cache, t=tables, n=lens: mla_decode(q, c, t, n, scale, lat)  # noqa: E731
        shape = f"MLA decode B={b} ctx={ctx} H=128 512+64"
        record(shape, "mla_decode vs generic kernel", "max_rel_err", rel(mine(), generic()), "ratio")
        t_g, t_m = graph_time_ms(generic), graph_time_ms(mine)
        latent_mb = b * ctx * (lat + rope) * 2 / 1e6
        record(shape, "generic paged kernel (baseline)", "us", t_g * 1e3, "us")
        record(shape, "mla_decode", "us", t_m * 1e3, "us")
        record(shape, "mla_decode vs generic", "speedup", t_g / t_m, "x")
        record(shape, "mla_decode latent bytes / time", "bandwidth", latent_mb / t_m, "GB/s")
        del cache


V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
      "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
      "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
      "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
      "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
      "norm_topk_prob": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000,
      "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "moe_layer_freq": 1,
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]},
      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                       "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}


def _v3_model(layers: int):
    from deepfleet.models.config import parse_config
    from deepfleet.models.layers import use_fused_kernels
    from deepfleet.models.loader import load_model

    use_fused_kernels(False)  # plain element-wise ops: no torch.compile time on the lease; all inside one graph
    cfg = parse_config({**V3, "num_hidden_layers": layers}, Path("/tmp/v3"))
    return load_model(cfg, torch.bfloat16, DEV, 4096, load_format="dummy")


def _v3_decode(model, layers: int, b: int, ctx: int = 128, bs: int = 16):
    """A function running one decode step of b sequences of ctx tokens through the model."""
    from deepfleet.models.attention import AttentionMetadata

    blocks = b * ctx // bs + 1
    caches = [(torch.zeros(blocks, bs, 1, 576, device=DEV, dtype=torch.bfloat16), None) for _ in range(layers)]
    meta = AttentionMetadata(
        num_decodes=b, slot_mapping=torch.arange(b, device=DEV) * ctx + ctx - 1,
        context_lens=torch.full((b,), ctx, device=DEV, dtype=torch.int32),
        block_tables=torch.arange(b * ctx // bs, device=DEV, dtype=torch.int32).view(b, ctx // bs),
        block_size=bs, prefills=[], query_start_loc=torch.arange(b + 1, device=DEV, dtype=torch.int32),
        max_query_len=1)
    ids = torch.randint(0, 1000, (b,), device=DEV)
    pos = torch.full((b,), ctx - 1, device=DEV)
    return lambda: model(ids, pos, caches, meta)


def choose_start_up_paths(model) -> None:
    """What the engine's start-up does before capturing its batch-1 graph (engine/model_runner.py): per projection
    shape the one-row GEMV or the default kernel, and what else models/layers.py choose_gemv times, by timing."""
    from deepfleet.models.layers import choose_gemv, one_row_sites

    t0 = time.time()
    timings = choose_gemv(model, DEV, torch.bfloat16)
    chosen = {f"{n}x{k}{' silu' if silu else ''}": tiles if gemv < default else None
              for (n, k, silu), (default, gemv, tiles) in timings.items()}
    moe = [m for modules in one_row_sites(model).values() for m in modules]
    print(f"start-up choices ({time.time() - t0:.1f} s): {chosen}; MoE one-row tiles "
          f"{moe[0].one_row_tiles if moe else 'n/a'}", flush=True)


def v3_layers(batches=(1, 64, 256)):
    """One MoE layer's decode time from the 6- and 2-layer models; at batch 1 also after the engine's start-up
    choices (choose_start_up_paths), which are what its batch-1 graph runs."""
    ctx = 128
    times = {}
    for layers in (2, 6):
        model = _v3_model(layers)
        for b in batches:
            with torch.inference_mode():
                times[(layers, b)] = graph_time_ms(_v3_decode(model, layers, b, ctx), reps=10)
        if 1 in batches:
            choose_start_up_paths(model)
            with torch.inference_mode():
                times[(layers, "1 chosen")] = graph_time_ms(_v3_decode(model, layers, 1, ctx), reps=10)
        model = None  # free before the next size is made
        torch.cuda.empty_cache()
    # one MoE layer's bytes at batch 1: attention (FP8; kv_b_proj dequantized to bf16), 8 routed + 1 shared
    # experts, the bf16 router
    attn = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 16384 * 7168 + 512 * 128 * 256 * 2
    experts = 9 * 3 * 7168 * 2048
    moe_bytes = attn + experts + 256 * 7168 * 2
    for b in batches:
        per = (times[(6, b)] - times[(2, b)]) / 4
        shape = f"V3 full-width MoE layer batch {b} ctx {ctx}"
        record(shape, "decode, CUDA graph, (6-layer - 2-layer)/4", "ms_per_layer", per, "ms")
        record(shape, "6-layer model (1 dense + 5 MoE) step", "ms", times[(6, b)], "ms")
        if b == 1:
            record(shape, "FP8 bytes read per layer", "bytes", moe_bytes / 1e6, "MB")
            record(shape, "time vs bytes at 4.8 TB/s (datasheet)", "floor_ratio", per / (moe_bytes / 4.8e9), "x")
            chosen = (times[(6, "1 chosen")] - times[(2, "1 chosen")]) / 4
            record(shape, "decode, CUDA graph, start-up choices, (6-2)/4", "ms_per_layer", chosen, "ms")
            record(shape, "6-layer model step, start-up choices", "ms", times[(6, "1 chosen")], "ms")
            record(shape, "start-up choices: time vs bytes at 4.8 TB/s", "floor_ratio",
                   chosen / (moe_bytes / 4.8e9), "x")
        else:
            record(shape, "tokens per second per layer", "throughput", b / per * 1e3, "tok/s")


def v3_profile():
    """Where the batch-1 decode time of a full-width V3 goes: a 2-layer model (1 dense + 1 MoE layer), one step
    replayed in a CUDA graph (its time) and run eagerly under torch.profiler: GPU time per kernel, summed by name.
    The sum against the graph's time is the GPU's idle share (launch gaps, dependencies)."""
    from torch.profiler import ProfilerActivity, profile

    model = _v3_model(2)
    step = _v3_decode(model, 2, 1)
    with torch.inference_mode():
        record("V3 2-layer (1 dense + 1 MoE) batch 1", "decode step, CUDA graph replay", "ms", graph_time_ms(step),
               "ms")
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    record("V3 2-layer (1 dense + 1 MoE) batch 1", "eager step, sum of GPU kernel time", "ms",
           sum(e.device_time_total for e in kernels) / 1e3, "ms")
    record("V3 2-layer (1 dense + 1 MoE) batch 1", "eager step, kernel launches", "count",
           sum(e.count for e in kernels), "count")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:20]:
        record(f"V3 2-layer batch 1 kernel {e.key[:60]}", f"GPU time ({e.count} launches)", "us",
               e.device_time_total, "us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    ap.add_argument("--skip", default="")
    ap.add_argument("--v3-batches", default="1,64,256", help="batch sizes of the v3 section")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("deepfleet.models.layers").setLevel(logging.INFO)  # the start-up choices' timings
    v3_batches = tuple(int(b) for b in a.v3_batches.split(","))
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name, fn in (("correctness", correctness), ("dispatch", dispatch), ("padded", padded),
                     ("dense", dense_7b), ("mla", mla),
                     ("engine", engine_graphs), ("moe", moe_256), ("v3", lambda: v3_layers(v3_batches)),
                     ("v3profile", v3_profile)):
        if name in a.skip.split(","):
            continue
        t0 = time.time()
        try:
            fn()
        except Exception as e:  # report and go on: one failed section must not cost the others' device time
            import traceback

            traceback.print_exc()
            print(f"SECTION {name} FAILED: {e!r}", flush=True)
        print(f"-- {name}: {time.time() - t0:.1f}s", flush=True)
        date = datetime.date.today().isoformat()
        dev = torch.cuda.get_device_name()
        with open(a.out, "w") as f:  # after each section: a run cut off by its time limit keeps what it measured
            for r in RECORDS:
                f.write(json.dumps({"date": date, "device": dev, "commit": a.commit, **r}) + "\n")


if __name__ == "__main__":
    main()
