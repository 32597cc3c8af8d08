"""Where one engine step spends its time (GPU): `python bench/profile_step.py --shape 1.5b --out DIR`.

- ttft: one 512-token prompt alone, host wall time of the launch vs the GPU time, and a torch.profiler table of
  that step (CPU and CUDA time per op).
- host: cProfile of engine.step() at 256 (--host-batches) running decode sequences (most own time first).
- graph: the decode graph of 256 sequences replayed alone (its GPU time, from events) and the host time of one
  replay call with the GPU idle, right after the host profile (the buffers hold a real 256-sequence step).
- kernels: at each --kernel-batches (batch 1: decode at 512 context, engine ms/token; larger: 128-token prompts
  10 steps in), the decode graph's GPU time per replay, and a torch.profiler table of its kernels per replay
  (count, mean and total time by kernel name) with the GPU time inside kernels against the replay's span.
  `--quantization fp8`: the shape's weights quantized on load (the FP8 decode graphs).
- prefill: attention alone on one fresh 8k prompt, the Triton paged kernel vs torch SDPA (flash / cuDNN), and the
  engine's SDPA route for long chunks (models/attention.py) against the paged kernel: a fresh 8k chunk and a 4k
  chunk over 4k of cached context.
- breakdown: the benchmark's host profile (engine/benchmark.py Bench.host_profile) at each of --host-batches."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from deepfleet.engine.benchmark import _ids, fixed, write_shape_dir
from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams


def _ttft_once(e, rng, tag) -> tuple[float, float]:
    e.add_request(tag, _ids(rng, 512), SamplingParams(temperature=0, ignore_eos=True, max_tokens=1))
    torch.cuda.synchronize()
    t = time.perf_counter()
    e.step()  # launches the prefill
    launched = time.perf_counter() - t
    while not any(o.outputs[0].token_ids for o in e.step()):
        pass
    total = time.perf_counter() - t
    while e.has_unfinished_requests():
        e.step()
    return 1e3 * launched, 1e3 * total


def ttft(e, out: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(4):
        _ttft_once(e, rng, f"w{i}")
    runs = [_ttft_once(e, rng, f"t{i}") for i in range(6)]
    print("ttft runs (launch ms, total ms):", [(round(a, 2), round(b, 2)) for a, b in runs])
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _ttft_once(e, rng, "p")
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    (out / "ttft_profile.txt").write_text(table + "\n\n" + prof.key_averages().table(sort_by="cuda_time_total",
                                                                                     row_limit=40))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def _fill(e, batch: int) -> None:
    """`batch` sequences decoding (128-token prompts, 10 steps in), so the next steps replay the decode graph."""
    for i, (prompt, n) in enumerate(fixed(batch, 128, 400, seed=5)):
        e.add_request(f"h{i}", prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=n))
    while len(e.scheduler.running) < batch or any(s.num_uncomputed > 1 for s in e.scheduler.running):
        e.step()
    for _ in range(10):
        e.step()


def host(e, out: Path, batch: int = 256) -> None:
    print(f"== host profile at {batch}")
    _fill(e, batch)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        e.step()
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t) / 50
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        e.step()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(35)
    (out / f"host_cprofile_{batch}.txt").write_text(s.getvalue())
    print(f"decode step at {batch}: {1e3 * plain:.2f} ms")
    print("\n".join(s.getvalue().splitlines()[:50]))
    graph_time(e, batch)
    while e.has_unfinished_requests():
        e.step()


def graph_time(e, batch: int) -> None:
    torch.cuda.synchronize()
    g, _ = e.runner.graphs[batch]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    g.replay()
    launch = time.perf_counter() - t
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        g.replay()  # back to back: does a launch wait for the same graph's previous run?
    queued = (time.perf_counter() - t) / 3
    torch.cuda.synchronize()
    print(f"decode graph {batch}: GPU {start.elapsed_time(end) / 20:.3f} ms per replay, host launch {1e3 * launch:.3f}"
          f" ms (GPU idle), {1e3 * queued:.3f} ms back to back")


def kernels(e, out: Path, batch: int = 1, replays: int = 20) -> None:
    """Batch 1: one 512-token prompt decoding; larger batches: `_fill`'s 128-token prompts."""
    from torch.profiler import ProfilerActivity, profile

    if batch == 1:
        rng = np.random.default_rng(9)
        e.add_request("k", _ids(rng, 512), SamplingParams(temperature=0, ignore_eos=True, max_tokens=96))
        times = []
        while e.has_unfinished_requests():
            if e.step():
                times.append(time.perf_counter())
            if len(times) == 48:
                break
        print(f"batch-1 engine step: {1e3 * (times[-1] - times[16]) / (len(times) - 17):.3f} ms/token")
    else:
        _fill(e, batch)
    graph_time(e, batch)
    g, _ = e.runner.graphs[batch]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    rows = sorted((k for k in ka if k.device_type.name == "CUDA" or getattr(k, "self_device_time_total", 0)),
                  key=lambda k: -k.self_device_time_total)
    total = sum(k.self_device_time_total for k in rows)
    n_kernels = sum(k.count for k in rows) / replays
    lines = [f"kernels per replay {n_kernels:.0f}, kernel time per replay {total / replays:.1f} us"]
    for k in rows:
        lines.append(f"{k.count / replays:7.1f} x {k.self_device_time_total / max(k.count, 1):8.2f} us = "
                     f"{k.self_device_time_total / replays:8.1f} us  {k.key[:150]}")
    kern = sorted((ev.time_range.start, ev.time_range.end) for ev in prof.events()
                  if ev.device_type.name == "CUDA")
    if kern:
        span = (kern[-1][1] - kern[0][0]) / replays
        lines.append(f"replay span {span:.1f} us per replay over {len(kern)} device events")
    text = "\n".join(lines)
    (out / f"kernels_{e.model_name}{'_' + e.config.quantization if e.config.quantization else ''}_{batch}.txt"
     ).write_text(text)
    print(text)
    while e.has_unfinished_requests():
        e.step()


def prefill(shape_heads: tuple[int, int], n: int = 8192) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from deepfleet.kernels.paged_attention import paged_attention

    heads, kv_heads = shape_heads
    d, bs = 128, 16
    q = torch.randn(n, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    blocks = n // bs
    perm = torch.randperm(blocks, device="cuda")
    kc = torch.empty(blocks, bs, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.empty_like(kc)
    kc[perm] = k.view(blocks, bs, kv_heads, d)
    vc[perm] = v.view(blocks, bs, kv_heads, d)
    table = perm.int()[None]
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    flops = 4 * heads * d * n * n / 2
    from triton.testing import do_bench

    def tri():
        return paged_attention(q, kc, vc, d, table, lens, qsl, n, d**-0.5)

    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    ref = None
    rows = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                def sd():
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                o = sd()
                ms = do_bench(sd, return_mode="median")
            ref = o[0].transpose(0, 1) if ref is None else ref
            rows.append((f"sdpa {name} (gqa)", ms))
        except Exception as exc:  # noqa: BLE001
            rows.append((f"sdpa {name} (gqa): {type(exc).__name__} {str(exc)[:80]}", float("nan")))
    o = tri()
    rows.append(("triton paged", do_bench(tri, return_mode="median")))
    if ref is not None:
        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"triton vs sdpa rel err {err:.2e}")
    sdpa_route(q, k, v, kc, vc, table, n, d)
    try:
        from torch.nn.attention import varlen
        print("torch.nn.attention.varlen:", [x for x in dir(varlen) if not x.startswith("_")])
    except Exception as exc:  # noqa: BLE001
        print("no varlen:", exc)
    for name, ms in rows:
        print(f"prefill {heads}/{kv_heads} x {n}: {name:<60} {ms:8.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s")


def sdpa_route(q, k, v, kc, vc, table, n, d) -> None:
    """models/attention.long_prefill_attention vs the paged kernel: fresh n tokens; the last n/2 over n/2 cached."""
    from triton.testing import do_bench

    from deepfleet.kernels.paged_attention import paged_attention
    from deepfleet.models.attention import AttentionMetadata, long_prefill_attention

    half = n // 2
    for name, qs, prefills in (("fresh", slice(0, n), [(n, n)]), ("over cache", slice(half, n), [(half, n)])):
        qlen = prefills[0][0]
        meta = AttentionMetadata(0, torch.empty(0, dtype=torch.long, device="cuda"),
                                 torch.tensor([n], dtype=torch.int32, device="cuda"), table, 16, prefills,
                                 torch.tensor([0, qlen], dtype=torch.int32, device="cuda"), qlen)

        def route(qs=qs, meta=meta):
            return long_prefill_attention(q[qs], k[qs], v[qs], kc, vc, meta, d**-0.5)

        def kernel(qs=qs, meta=meta, qlen=qlen):
            return paged_attention(q[qs], kc, vc, d, table, meta.context_lens, meta.query_start_loc, qlen, d**-0.5)

        a, b = route().float(), kernel().float()
        err = ((a - b).norm() / b.norm()).item()
        print(f"sdpa route {name} {q.shape[1]} heads: rel err vs paged kernel {err:.2e}, "
              f"{do_bench(route, return_mode='median'):.3f} ms vs {do_bench(kernel, return_mode='median'):.3f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--parts", nargs="+", default=["prefill", "ttft", "host"])
    ap.add_argument("--host-batches", type=int, nargs="+", default=[256])
    ap.add_argument("--kernel-batches", type=int, nargs="+", default=[1], help="decode graph sizes to profile")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="engine.quantization (default: bf16)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def part(fn, *a):
        try:
            fn(*a)
        except Exception:  # noqa: BLE001  one failing part should not hide the others
            traceback.print_exc()

    if "prefill" in args.parts:
        part(prefill, (28, 4))
        part(prefill, (12, 2))
    with tempfile.TemporaryDirectory() as tmp:
        d = write_shape_dir(args.shape, Path(tmp) / args.shape)
        t = time.perf_counter()
        e = LLMEngine(EngineConfig(model=str(d), dtype="bfloat16", device="cuda", load_format="dummy",
                                   max_num_seqs=max(256, *args.kernel_batches, *args.host_batches),
                                   quantization=args.quantization))
        print(f"ready in {time.perf_counter() - t:.1f} s")
        if "ttft" in args.parts:
            part(ttft, e, args.out)
        if "kernels" in args.parts:
            for b in args.kernel_batches:
                part(kernels, e, args.out, b)
        if "host" in args.parts:
            for b in args.host_batches:
                part(host, e, args.out, b)
        if "breakdown" in args.parts:
            from deepfleet.engine.benchmark import Bench

            bench = Bench(args.shape, e, "-", torch.cuda.get_device_name())
            for b in args.host_batches:
                part(bench.host_profile, b)
            for r in bench.records:
                print(f"breakdown {r['workload']} {r['metric']}: {r['value']} {r['unit']}")
