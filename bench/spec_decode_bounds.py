"""Speculative decoding's speed-up bounds on random weights (issue 14): random weights make real acceptance
meaningless, so the mechanism is measured at its two ends with the same greedy requests:

  none    no speculation (the baseline; its output is the reference continuation)
  agree   drafts that always agree: the next k tokens of the reference (the upper bound)
  never   drafts that never agree: each reference token + 1 (the lower bound: the verify cost for nothing)

at each k in --k and each batch size in --batch, through the prompt-lookup path (drafting costs nothing there; the
MTP layer's own cost is measured by bench/deepseek_v3_full.py). Reported: decode tok/s per batch, acceptance rate,
and whether the output equals the baseline token for token (with "agree", a bf16 verify pass that differs from the
decode pass in rounding can flip a near tie on random weights, after which the drafts stop agreeing: the
acceptance rate shows it; --dtype float32 removes that).

    python bench/spec_decode_bounds.py --shape 7b --out $OUT --commit $(git rev-parse --short HEAD)     # a GPU
    python bench/spec_decode_bounds.py --shape tiny --device cpu --batch 1,4 --k 1,2 --tokens 24 --out /tmp/sd

Writes OUT/results.jsonl (bench/results.jsonl format) and OUT/table.txt."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from deepfleet.engine.spec_decode import speculator as speculator_module


class ScriptedDrafts:
    """Stands in for prompt lookup: drafts from the reference continuation of the request whose prompt starts
    the token ids, shifted by `offset` (0: agree, 1: never agree)."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], prompt_len: int, vocab: int, offset: int):
        self.reference, self.prompt_len, self.vocab, self.offset = reference, prompt_len, vocab, offset

    def propose(self, token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
        ref = self.reference[tuple(token_ids[: self.prompt_len])]
        return [(t + self.offset) % self.vocab for t in ref[len(token_ids) : len(token_ids) + k]]


def model_dir(shape: str, root: Path) -> Path:
    if shape == "tiny":
        from deepfleet.models.tiny import make_tiny_model

        return make_tiny_model(root / "tiny", "qwen2")
    from deepfleet.engine.benchmark import write_shape_dir

    return write_shape_dir(shape, root / shape)


def decode(engine, prompts: list[list[int]], tokens: int, device: str) -> tuple[float, list[list[int]]]:
    """Decode tok/s over the whole batch (tokens after each request's first, over the time after the first
    token of all), and the outputs."""
    from deepfleet.engine.sampling_params import SamplingParams

    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=tokens))
    done, t_first = {}, None
    while engine.has_unfinished_requests():
        outs = engine.step()
        if t_first is None and outs and all(o.outputs[0].token_ids for o in outs) and len(outs) == len(prompts):
            if device == "cuda":
                torch.cuda.synchronize()
            t_first = time.perf_counter()
        for o in outs:
            if o.finished:
                done[int(o.request_id)] = list(o.outputs[0].token_ids)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - (t_first or time.perf_counter())
    return len(prompts) * (tokens - 1) / elapsed if elapsed > 0 else float("nan"), [done[i] for i in range(len(done))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", help="7b, 1.5b (engine/benchmark.py) or tiny (CPU check)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine

    mdir = model_dir(args.shape, args.out / "model")
    vocab = json.loads((mdir / "config.json").read_text())["vocab_size"]
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    lines = [f"{args.shape} {args.dtype} on {device_name}: decode tok/s (whole batch), greedy, "
             f"{args.prompt_len} -> {args.tokens}"]

    def row(metric, value, unit, workload):
        r = {"date": datetime.now(UTC).date().isoformat(), "device": device_name, "commit": args.commit,
             "shape": f"{args.shape} {args.dtype}", "workload": workload, "metric": metric,
             "value": round(value, 3) if isinstance(value, float) else value, "unit": unit}
        with (args.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
        lines.append(f"  {workload:<44} {metric:<18} {value:>10.4g} {unit}")
        print(lines[-1], flush=True)
        (args.out / "table.txt").write_text("\n".join(lines) + "\n")

    def engine(speculative=None):
        return LLMEngine(EngineConfig(model=str(mdir), device=args.device, dtype=args.dtype, load_format="dummy",
                                      max_model_len=args.prompt_len + args.tokens + 16, max_num_seqs=max(args.batch),
                                      enable_prefix_caching=False, speculative=speculative))

    g = torch.Generator().manual_seed(0)
    plain = engine()
    base: dict[int, tuple[float, list[list[int]]]] = {}
    for b in args.batch:
        prompts = torch.randint(1, min(vocab, 500), (b, args.prompt_len), generator=g).tolist()
        decode(plain, prompts[:1], 8, args.device)  # warm-up
        rate, outs = decode(plain, prompts, args.tokens, args.device)
        base[b] = (rate, outs, prompts)
        row("decode_tok_s", rate, "tok/s", f"batch {b}, no speculation")
    del plain
    original = speculator_module.ngram.propose
    try:
        for k in args.k:
            spec = engine({"method": "ngram", "num_speculative_tokens": k})
            for b in args.batch:
                rate0, outs0, prompts = base[b]
                reference = {tuple(p): p + o for p, o in zip(prompts, outs0, strict=True)}
                for name, offset in (("agree", 0), ("never", 1)):
                    scripted = ScriptedDrafts(reference, args.prompt_len, vocab, offset)
                    speculator_module.ngram.propose = scripted.propose
                    decode(spec, prompts[:1], 8, args.device)  # warm-up of this k's verify shapes
                    before = spec.stats().spec_decode
                    rate, outs = decode(spec, prompts, args.tokens, args.device)
                    after = spec.stats().spec_decode
                    drafted = after.num_draft_tokens - before.num_draft_tokens
                    accepted = (after.num_accepted_tokens - before.num_accepted_tokens) / max(1, drafted)
                    work = f"batch {b}, k={k}, drafts {name}"
                    row("decode_tok_s", rate, "tok/s", work)
                    row("speedup", rate / rate0, "x", work)
                    row("acceptance", accepted, "ratio", work)
                    row("identical", int(outs == outs0), "bool", work)
            del spec
    finally:
        speculator_module.ngram.propose = original


if __name__ == "__main__":
    main()
