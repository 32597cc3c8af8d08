"""Throughput benchmark of the engine on DeepSeek-R1-Distill-Qwen shapes with random weights (bf16, GPU):
batch-1 decode tok/s and offline throughput (N requests, prompt P -> O new tokens), beside Hugging Face
transformers `generate` (eager attention) measured in the same run, and the HBM floor
(weight bytes / measured device copy bandwidth). Used by `deepfleet bench` and bench/throughput.py."""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # DeepSeek-R1-Distill-Qwen-1.5B / -7B (Qwen2)
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def write_shape_dir(shape: str, out: Path) -> Path:
    from deepfleet.models.tiny import CONFIGS, build_tokenizer

    cfg = {**CONFIGS["qwen2"], **SHAPES[shape], "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
           "rope_theta": 10000.0, "eos_token_id": None, "bos_token_id": None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    build_tokenizer(544).save(str(out / "tokenizer.json"))
    return out


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t)


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def bench_hf(model_dir: Path, prompt_len: int, output_len: int, batch: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager").eval()
    res = {}
    for name, bsz in (("batch1", 1), ("batched", batch)):
        ids = torch.tensor(_prompts(bsz, prompt_len, config.vocab_size), device="cuda")
        kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        res[name] = (out.shape[1] - prompt_len) * bsz / (time.perf_counter() - t)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def bench_engine(model_dir: Path, prompt_len: int, output_len: int, num_requests: int) -> dict:
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
    from deepfleet.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="bfloat16", device="cuda", load_format="dummy",
                                    max_model_len=prompt_len + output_len + 16))
    init_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len)
    vocab = engine.runner.cfg.vocab_size

    def run(prompts: list[list[int]], tag: str) -> float:
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, params)
        torch.cuda.synchronize()
        t = time.perf_counter()
        done = 0
        while engine.has_unfinished_requests():
            done += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
        torch.cuda.synchronize()
        return done / (time.perf_counter() - t)

    run(_prompts(4, prompt_len, vocab, seed=1), "warm")  # captures the small-batch graphs
    run(_prompts(1, prompt_len, vocab, seed=1), "warm1")  # and batch 1's
    # batch-1 breakdown: model step (input building + forward + logits, GPU synced) against the rest of the step
    execute, in_execute = engine.runner.execute, [0.0]

    def timed_execute(out):
        t = time.perf_counter()
        logits = execute(out)
        torch.cuda.synchronize()
        in_execute[0] += time.perf_counter() - t
        return logits

    engine.runner.execute = timed_execute
    t_b1 = time.perf_counter()
    batch1 = run(_prompts(1, prompt_len, vocab, seed=2), "b1")
    t_b1 = time.perf_counter() - t_b1
    del engine.runner.execute  # back to the class method (a stored bound method would keep the runner alive)
    run(_prompts(engine.scheduler.max_num_seqs, prompt_len, vocab, seed=3), "warm2")  # large-batch graphs
    offline = run(_prompts(num_requests, prompt_len, vocab, seed=4), "offline")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(_prompts(min(256, num_requests), prompt_len, vocab, seed=5), "prof")
    profile = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    stats = engine.stats()
    res = dict(init_s=init_s, batch1=batch1, b1_model_ms=1e3 * in_execute[0] / output_len,
               b1_step_ms=1e3 * t_b1 / output_len, offline=offline, max_num_seqs=engine.scheduler.max_num_seqs,
               kv_blocks=engine.block_manager.num_blocks, preemptions=stats.num_preemptions, profile=profile)
    engine = None  # drop the KV cache and weights before the next shape
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run(shape: str = "1.5b", num_requests: int = 2000, prompt_len: int = 128, output_len: int = 128,
        hf_baseline: bool = True, hf_batch: int = 128) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a CUDA GPU")
    bw = copy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape_dir(shape, Path(tmp) / shape)
        hf = bench_hf(model_dir, prompt_len, output_len, hf_batch) if hf_baseline else {}
        eng = bench_engine(model_dir, prompt_len, output_len, num_requests)
    cfg = SHAPES[shape]
    h, i, v, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    params = 2 * v * h + n_layers * (h * (h + 2 * kv) + h * h + 3 * h * i)
    floor = bw / (params * 2)
    print(eng["profile"])
    print(f"\n== {shape} bf16, prompt {prompt_len} -> {output_len} new tokens, {torch.cuda.get_device_name()} ==")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; weights {params * 2 / 1e9:.2f} GB; HBM floor {floor:.0f} tok/s")
    print(f"engine init {eng['init_s']:.1f} s, max_num_seqs {eng['max_num_seqs']}, KV blocks {eng['kv_blocks']}, "
          f"preemptions {eng['preemptions']}")
    print(f"batch-1 per token: {eng['b1_step_ms']:.2f} ms per step, of which model step {eng['b1_model_ms']:.2f} ms "
          f"(floor {1e3 / floor:.2f} ms)")
    print(f"{'metric':<34}{'deepfleet':>12}{'HF eager':>12}")
    print(f"{'batch-1 decode tok/s':<34}{eng['batch1']:>12.1f}{hf.get('batch1', float('nan')):>12.1f}"
          f"   ({100 * eng['batch1'] / floor:.0f}% of floor)")
    print(f"{f'offline tok/s ({num_requests} req; HF b={hf_batch})':<34}{eng['offline']:>12.1f}"
          f"{hf.get('batched', float('nan')):>12.1f}")
    return dict(shape=shape, bandwidth=bw, floor=floor, engine=eng, hf=hf)
