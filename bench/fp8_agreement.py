"""FP8 vs bf16 on the same weights (GPU): a random-weight Qwen2 at dimensions on the 128 grid, served once in
bf16 and once with `--quantization fp8` (quantized on load from the same checkpoint), batch-1 greedy decode of a
few prompts through the engine (CUDA graphs, the FP8 kernels the table picks). Reports greedy token agreement
(positions equal until the first divergence, and over all positions) and the logprob error: both engines score
the bf16 continuation as a prompt (prompt_logprobs), max and mean |logprob difference| per token.

  python bench/fp8_agreement.py --out agreement.jsonl [--commit SHA]"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.models.tiny import make_tiny_model

# Qwen2 at 128-multiples (FP8's 128x128 blocks); head_dim 64 as the 7B's is 128: any the kernels take
DIMS = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, torch_dtype="bfloat16", initializer_range=0.05)
PROMPT_LEN = 32


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    for i, p in enumerate(prompts):  # one at a time: the batch-1 path
        engine.add_request(f"r{i}", p, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    prompts[i] = out
    return prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1)")
    a = ap.parse_args()
    rng = np.random.default_rng(3)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "qwen2", "qwen2", **DIMS)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        prompts = [rng.integers(10, vocab, PROMPT_LEN).tolist() for _ in range(a.prompts)]
        greedy = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
        tokens, scored = {}, {}
        for q in (None, "fp8"):
            engine = LLMEngine(EngineConfig(model=str(model), dtype="bfloat16", device=a.device, quantization=q,
                                            gpu_memory_utilization=0.3))
            tokens[q] = [o.outputs[0].token_ids for o in run(engine, [list(p) for p in prompts], greedy)]
            tokens.setdefault("continuation", [p + t for p, t in zip(prompts, tokens[None], strict=True)])
            score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
            scored[q] = [[d["logprob"] for d in o.prompt_logprobs[PROMPT_LEN:]]
                         for o in run(engine, [list(c) for c in tokens["continuation"]], score)]
            del engine
            torch.cuda.empty_cache()
    pairs = list(zip(tokens[None], tokens["fp8"], strict=True))
    prefix = [next((i for i, (x, y) in enumerate(zip(b, f, strict=True)) if x != y), len(b)) for b, f in pairs]
    same = sum(x == y for b, f in pairs for x, y in zip(b, f, strict=True))
    diff = np.abs(np.array(scored[None]) - np.array(scored["fp8"]))
    figures = {"greedy_prefix_agreement": (100 * sum(prefix) / (a.prompts * a.tokens), "percent"),
               "greedy_token_agreement": (100 * same / (a.prompts * a.tokens), "percent"),
               "logprob_abs_err_max": (float(diff.max()), "nats"), "logprob_abs_err_mean": (float(diff.mean()), "nats")}
    shape = f"qwen2 random h512 i1536 L4, batch 1 greedy, {a.prompts} prompts x {a.tokens} tokens"
    device = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    with open(a.out, "w") as f:
        for metric, (value, unit) in figures.items():
            print(f"{metric}: {value:.4f} {unit}", flush=True)
            f.write(json.dumps(dict(date=datetime.date.today().isoformat(), device=device,
                                    commit=a.commit, shape=shape, workload="fp8 vs bf16, same weights",
                                    metric=metric, value=round(value, 4), unit=unit)) + "\n")


if __name__ == "__main__":
    main()
