"""LoRA on the GPU (issue 17): the batched LoRA kernels against their reference, and what adapters cost decode.

    PYTHONPATH=runtime python3 bench/lora_gpu.py --shape 7b --results bench/results.jsonl

1. Kernels. kernels/lora.py's `lora_add` (Triton shrink + expand) on bf16 tensors of the shape's four LoRA-able
   projections (qkv: 3 shards, o_proj, gate_up: 2 shards, down_proj), rank `--rank`, tokens of 4 adapters and of
   none mixed, at several token counts. Expected: written here, grouped by adapter in float64 (each adapter's
   tokens through its own A then B, shard by shard), independently of the kernels' per-token gathering; the torch
   path (kernels/lora_ops.lora_add_reference, CPU's) is held to the same expectation. Error in units of the bf16
   output's last place (1 ulp = 2^-7 |expected|, + 1e-3): the kernels accumulate in fp32 and round once, so they
   must stay within 1; tokens of no adapter must come back bit-identical. Each projection's kernel pair is timed
   (triton.testing.do_bench) next to the projection's own GEMM at the same token count.
2. Decode. The engine (dummy bf16 weights, CUDA graphs, `--max-num-seqs`) with B requests of `--prompt-len` random
   tokens -> `--output-len` tokens, greedy, ignore_eos, all added at once: output tok/s of the decode phase (from
   the step where every request has its first token to the end). Rows: LoRA off (the baseline: an engine without
   adapter slots), and one engine with 4 resident adapters of rank `--rank` on every projection: every request on
   the base model, all on 1 adapter, spread over 4. Medians of `--repeats` runs after a warm-up run each.

`--shape tiny` is this script's CPU smoke test (kernels under TRITON_INTERPRET=1, the tiny Qwen2 model)."""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_ADAPTERS = 4


def _dims(cfg: dict) -> dict[str, tuple[int, list[int]]]:
    """projection -> (in features, output shard sizes), as the model fuses them."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    head = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    return {"qkv_proj": (h, [h, kv, kv]), "o_proj": (h, [h]), "gate_up_proj": (h, [i, i]), "down_proj": (i, [h])}


# ---- 1. kernels ----------------------------------------------------------------------------------------------------


def _expected(y, x, a, b, slots, shards, rank):
    """float64, grouped by adapter: tokens of slot s get B_s,j (A_s,j x) on shard j's columns."""
    out = y.double().clone()
    null = a.shape[0] - 1
    offsets = [sum(shards[:j]) for j in range(len(shards))]
    for s in slots.unique().tolist():
        if s == null:
            continue
        idx = (slots == s).nonzero().flatten()
        xs = x[idx].double()
        for j, (lo, size) in enumerate(zip(offsets, shards, strict=True)):
            h = xs @ a[s, j * rank : (j + 1) * rank].double().T  # [n, rank]
            out[idx, lo : lo + size] += h @ b[s, lo : lo + size].double().T
    return out


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want).abs() / (2.0**-7 * want.abs() + 1e-3)).max())


def kernel_check(cfg: dict, rank: int, token_counts: list[int], device: str, record) -> bool:
    from deepfleet.kernels.lora import lora_add
    from deepfleet.kernels.lora_ops import lora_add_reference

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    ok = True
    print(f"{'projection':>13} {'T':>5} | {'kernel ulp':>10} {'torch ulp':>9} {'null same':>9} | "
          f"{'lora us':>8} {'GEMM us':>8} {'lora/GEMM':>9}")
    for name, (k, shards) in _dims(cfg).items():
        n = sum(shards)
        a = 0.05 * torch.randn(NUM_ADAPTERS + 1, len(shards) * rank, k, generator=g, device=device)
        b = 0.05 * torch.randn(NUM_ADAPTERS + 1, n, rank, generator=g, device=device)
        a[-1], b[-1] = 0, 0  # the null slot holds zeros, as the adapter slots keep it
        a, b = a.to(dtype), b.to(dtype)
        w = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(dtype)
        offsets = [sum(shards[:j]) for j in range(len(shards))]
        for t in token_counts:
            x = torch.randn(t, k, generator=g, device=device).to(dtype)
            y = torch.randn(t, n, generator=g, device=device).to(dtype)
            # every fifth token without an adapter, the rest spread over the 4 adapters
            slots = torch.randint(0, NUM_ADAPTERS + 1, (t,), generator=g, device=device)
            want = _expected(y, x, a, b, slots, shards, rank)
            got = lora_add(y.clone(), x, a, b, slots, offsets)
            ref = lora_add_reference(y.clone(), x, a, b, slots, offsets)
            null = slots == NUM_ADAPTERS
            same = bool(torch.equal(got[null], y[null]))
            k_ulp, r_ulp = _ulps(got, want), _ulps(ref, want)
            ok &= k_ulp <= 1.0 and same
            lora_us = gemm_us = float("nan")
            if device == "cuda":
                import triton.testing

                lora_us = 1e3 * triton.testing.do_bench(functools.partial(lora_add, y.clone(), x, a, b, slots, offsets))
                gemm_us = 1e3 * triton.testing.do_bench(functools.partial(torch.nn.functional.linear, x, w))
            print(f"{name:>13} {t:>5} | {k_ulp:>10.3f} {r_ulp:>9.3f} {str(same):>9} | {lora_us:>8.1f} "
                  f"{gemm_us:>8.1f} {lora_us / gemm_us:>9.2f}", flush=True)
            where = f"lora_add {name} T={t} rank {rank}, 4 adapters + none"
            record(where, "kernel_err_ulp", k_ulp, "ulp")
            record(where, "torch_ref_err_ulp", r_ulp, "ulp")
            record(where, "null_tokens_unchanged", float(same), "bool")
            if device == "cuda":
                record(where, "lora_add_us", lora_us, "us")
                record(where, "base_gemm_us", gemm_us, "us")
    return ok


# ---- 2. decode -----------------------------------------------------------------------------------------------------


def write_adapter(out: Path, cfg: dict, rank: int, seed: int) -> Path:
    """A PEFT-format adapter (adapter_config.json + adapter_model.safetensors) on every projection of every layer."""
    g = torch.Generator().manual_seed(seed)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    io = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
          "up_proj": (h, i), "down_proj": (i, h)}
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fin, fout) in io.items():
            part = "self_attn" if module[0] in "qkvo" else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}.lora_{{}}.weight"
            tensors[key.format("A")] = (0.02 * torch.randn(rank, fin, generator=g)).to(torch.bfloat16)
            tensors[key.format("B")] = (0.02 * torch.randn(fout, rank, generator=g)).to(torch.bfloat16)
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES)}))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def decode_rate(engine, batch: int, loras: list[str | None], prompt_len: int, output_len: int, seed: int) -> float:
    """Decode-phase output tok/s of `batch` requests added at once, request i on loras[i % len(loras)]."""
    from deepfleet.engine.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len)
    for i in range(batch):
        prompt = torch.randint(10, 540, (prompt_len,), generator=g).tolist()
        engine.add_request(f"s{seed}-{i}", prompt, params, lora=loras[i % len(loras)])
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    sync()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    return batch * (output_len - 1) / (time.perf_counter() - t0)


def decode_rows(engine, label: str, mixes: dict[str, list], args, record) -> None:
    for batch in args.batch:
        for mix, loras in mixes.items():
            decode_rate(engine, batch, loras, args.prompt_len, args.output_len, seed=1000 + batch)  # warm-up
            rates = [decode_rate(engine, batch, loras, args.prompt_len, args.output_len, seed=batch * 100 + r)
                     for r in range(args.repeats)]
            rate = statistics.median(rates)
            print(f"B={batch:>4} {label:>10} {mix:>12}: {rate:>9.0f} tok/s (runs: "
                  f"{', '.join(f'{x:.0f}' for x in rates)})", flush=True)
            record(f"decode B={batch}, {args.prompt_len}->{args.output_len}, {label}, {mix}", "decode_tok_s", rate,
                   "tok/s")


def _engine(model_dir: Path, args, device: str, **lora):
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine

    # a fixed KV cache (enough for every sequence's whole context): the two engines start alike and fast
    blocks = args.max_num_seqs * (args.prompt_len + args.output_len + 16) // 16 + 64
    gpu = {"dtype": "bfloat16", "device": "cuda", "load_format": "dummy", "num_kv_blocks": blocks} \
        if device == "cuda" else {"dtype": "float32", "device": "cpu"}
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), max_model_len=args.prompt_len + args.output_len + 16,
                                    max_num_seqs=args.max_num_seqs, **gpu, **lora))
    print(f"engine ({'LoRA on' if lora else 'LoRA off'}) ready in {time.perf_counter() - t:.1f} s", flush=True)
    return engine


def _free(engine) -> None:
    if hasattr(engine.runner, "close"):
        engine.runner.close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", help="1.5b or 7b (GPU), or tiny (CPU smoke test)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 2048], help="kernel check token counts")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--phases", default="kernels,decode")
    ap.add_argument("--results", help="append JSON records (bench/results.jsonl format) to this file")
    args = ap.parse_args()
    device = "cpu" if args.shape == "tiny" else "cuda"

    from deepfleet.engine.benchmark import SHAPES, write_shape_dir
    from deepfleet.models.tiny import make_tiny_model

    if device == "cuda" and args.shape not in SHAPES:
        raise SystemExit(f"--shape: {args.shape!r} is not one of tiny, {', '.join(sorted(SHAPES))}")

    records: list[dict] = []
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    label = f"R1-Distill-Qwen-{args.shape.upper()} bf16" if device == "cuda" else "tiny qwen2 float32"

    def record(workload: str, metric: str, value: float, unit: str) -> None:
        records.append(dict(date=datetime.date.today().isoformat(), device=name,
                            commit=os.environ.get("DEEPFLEET_COMMIT", "unknown"), shape=label, workload=workload,
                            metric=metric, value=round(float(value), 4), unit=unit))

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if device == "cpu":
            model_dir = make_tiny_model(Path(tmp) / "tiny", arch="qwen2")
        else:
            model_dir = write_shape_dir(args.shape, Path(tmp) / args.shape,
                                        max_model_len=args.prompt_len + args.output_len + 16)
        cfg = json.loads((model_dir / "config.json").read_text())
        phases = args.phases.split(",")
        if "kernels" in phases:
            ok = kernel_check(cfg, args.rank, args.tokens, device, record)
            print(f"kernels {'within 1 ulp of the float64 expectation' if ok else 'FAILED the check'}", flush=True)
        if "decode" in phases:
            engine = _engine(model_dir, args, device)
            decode_rows(engine, "LoRA off", {"no adapter": [None]}, args, record)
            _free(engine)
            dirs = {f"a{k}": str(write_adapter(Path(tmp) / f"a{k}", cfg, args.rank, seed=k))
                    for k in range(NUM_ADAPTERS)}
            engine = _engine(model_dir, args, device, enable_lora=True, max_loras=NUM_ADAPTERS,
                             max_lora_rank=args.rank, lora_modules=dirs)
            decode_rows(engine, "LoRA on", {"base only": [None], "1 adapter": ["a0"], "4 adapters": list(dirs)},
                        args, record)
            _free(engine)
    if args.results:
        with open(args.results, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    if not ok:
        raise SystemExit("LoRA kernels: outside the tolerance (see the table)")


if __name__ == "__main__":
    main()
