"""Full-size DeepSeek-V3/R1 (671B, block FP8, random weights generated on the GPUs) with tensor/expert parallelism:
issue 20's run, and its reduced-depth checks.

    # nvidia-h200-x8, the real thing: 61 layers (3 dense + 58 MoE), 256 experts, MTP layer
    python bench/deepseek_v3_full.py --tp 8 --expert-parallel --out $OUT --commit $(git rev-parse --short HEAD)
    # one H200: full width, 4 layers (3 dense + 1 MoE) + the MTP layer, smaller workloads
    python bench/deepseek_v3_full.py --tp 1 --layers 4 --concurrency 16,64 --input-len 256 --output-len 128 --out $OUT
    # CPU, gloo: the tiny V3 (block FP8 needs tp's FP8 split for TP > 1, so bf16 there)
    python bench/deepseek_v3_full.py --tiny --bf16 --tp 2 --device cpu --concurrency 4,8 --input-len 32 \
        --output-len 16 --out /tmp/v3

The model directory holds only config.json (deepfleet/plan/presets.py's V3, `--layers`/`--experts` overriding) and
the tiny byte-level tokenizer with the R1 chat template: `engine.load_format: dummy` draws every weight on its
GPU (FP8 values of unit spread with block scales 0.02), so no 671 GB of files move.

Phases (`--phases`, in this order; the first four share one engine, mtp builds a second with the MTP layer):
  load        GPU memory per device after start-up (nvidia-smi) and the weight bytes rank 0 holds; KV capacity in
              tokens (blocks x block size) and the max_num_seqs the engine derived
  batch1      batch-1 decode tok/s per user: a 128-token prompt -> --batch1-tokens greedy tokens, decode time only
  throughput  --input-len in / --output-len out (default 1k / 2k) at each --concurrency (default 256, 1024): all
              requests arrive at once; output and total (in + out) tok/s, TTFT P50/P99 from arrival
  mtp         batch-1 with engine.speculative {method: mtp, k}, after a warm-up request: (a) the real MTP drafts
              (random weights: acceptance ~0, the cost when the draft never agrees), (b) drafts replaced by the
              greedy continuation the first engine produced (the draft always agrees: the upper bound, MTP layer
              cost included); acceptance rate
  serve       `deepfleet serve` of the model (dummy weights, same TP) answering the official openai client's chat
              completion; reasoning_content / content as split by the deepseek_r1 parser (the tiny tokenizer
              decodes 544 of the 129,280 ids, so random weights' text is mostly empty: the split itself is
              tested in tests/unit/server)

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set
here before torch loads and pass to every child (tensor-parallel workers take them from deepfleet's
nccl_env.child_env as well; the serve subprocess inherits them).

Writes OUT/results.jsonl (bench/results.jsonl format), OUT/table.txt, OUT/serve.log."""

from __future__ import annotations

import os

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_key] = _value  # forced, not defaulted: also for every child process

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

PHASES = ("load", "batch1", "throughput", "mtp", "serve")


# ---- the model directory ------------------------------------------------------------------------------------------
def model_dir(args, root: Path) -> Path:
    from deepfleet.models.tiny import CONFIGS, FP8_DEEPSEEK_V3, FP8_QUANTIZATION_CONFIG, write_tokenizer
    from deepfleet.plan.presets import preset

    if args.tiny:
        cfg = {**CONFIGS["deepseek_v3"], **FP8_DEEPSEEK_V3, "quantization_config": dict(FP8_QUANTIZATION_CONFIG)}
    else:
        cfg = json.loads(json.dumps(preset("deepseek-v3")))
        cfg.update(rms_norm_eps=1e-6, attention_bias=False, rope_interleave=True)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if args.experts:
        cfg["n_routed_experts"] = args.experts
    if args.bf16:
        cfg.pop("quantization_config", None)
    cfg["max_position_embeddings"] = max(cfg.get("max_position_embeddings", 0), args.max_model_len)
    out = root / "deepseek-v3"
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = write_tokenizer(out, cfg, CONFIGS["deepseek_v3"]["vocab_size"])
    cfg.update(bos_token_id=bos, eos_token_id=eos)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def engine_config(mdir: Path, args, **extra):
    """Prefix caching off: the MTP runs repeat the batch-1 prompt, and a prefix hit computes its last tokens along
    another numerical path, which in bf16 on random weights can flip a near tie and end the comparison."""
    from deepfleet.engine.llm_engine import EngineConfig

    return EngineConfig(model=str(mdir), device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32",
                        load_format="dummy", tensor_parallel_size=args.tp, expert_parallel=args.expert_parallel,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_seqs_cap=max(args.concurrency), enforce_eager=args.enforce_eager,
                        num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=False, **extra)


def with_engine(config, device: str, phase):
    """Runs phase(engine) on an engine of its own and tears it down after (worker processes, graphs, cached GPU
    memory). Only this frame and phase's hold the engine, so none outlives its phase: at 671B two would not fit."""
    from deepfleet.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    try:
        return phase(engine)
    finally:
        if hasattr(engine.runner, "close"):
            engine.runner.close()
        del engine
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 500) - 1, (n, length), generator=g).tolist()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- measurements -------------------------------------------------------------------------------------------------
def gpu_memory_used() -> list[float]:
    """GiB in use per GPU as the driver sees it (every process: the workers' too)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) / 1024 for x in out.split()]


def weight_bytes(engine) -> int:
    model = engine.runner.runner.model if hasattr(engine.runner, "workers") else engine.runner.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def run(engine, reqs: list[tuple[list[int], int]], tag: str, device: str, on_token=None) -> dict:
    """All requests at once; per request: arrival -> first token, tokens; wall time of the whole batch."""
    from deepfleet.engine.sampling_params import SamplingParams

    sync(device)
    t0 = time.perf_counter()
    first, done = {}, {}
    for i, (p, n) in enumerate(reqs):
        engine.add_request(f"{tag}-{i}", p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=n))
    while engine.has_unfinished_requests():
        for o in engine.step():
            now = time.perf_counter()
            if o.outputs[0].token_ids and o.request_id not in first:
                first[o.request_id] = now - t0
            if on_token is not None:
                on_token(o, now)
            if o.finished:
                done[o.request_id] = list(o.outputs[0].token_ids)
    sync(device)
    return {"wall": time.perf_counter() - t0, "ttft": sorted(first.values()), "done": done}


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] if values else float("nan")


def batch1(engine, prompt: list[int], n: int, device: str) -> tuple[float, list[int]]:
    """Decode tok/s of one request: tokens after the first over the time after the first."""
    stamps = []
    res = run(engine, [(prompt, n)], "b1", device,
              on_token=lambda o, now: stamps.append((now, len(o.outputs[0].token_ids))))
    (t1, n1), (t2, n2) = stamps[0], stamps[-1]
    return (n2 - n1) / (t2 - t1), res["done"]["b1-0"]


class Oracle:
    """Replaces the MTP layer's drafts by the known greedy continuation (the MTP layer still runs: its cost
    stays in): the draft always agrees, unless bf16 verification diverges from the reference decode."""

    def __init__(self, speculator, reference: list[int]):
        self.reference, self.keep = reference, speculator.keep_mtp_drafts
        speculator.keep_mtp_drafts = self

    def __call__(self, requests, drafts):
        out = []
        for (seq, _), d in zip(requests, drafts, strict=True):
            out.append(self.reference[seq.num_tokens : seq.num_tokens + len(d)] if d else d)
        self.keep(requests, out)


def serve_check(mdir: Path, args, log_path: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepfleet", "serve", str(mdir), "--host", "127.0.0.1", "--port", str(port),
           "--tensor-parallel-size", str(args.tp), "--served-model-name", "deepseek-v3", "--set",
           "engine.load_format=dummy", "--set", f"engine.device={args.device}", "--set",
           f"engine.max_model_len={args.max_model_len}", "--set", f"engine.max_num_seqs={args.serve_max_num_seqs}",
           "--set", "warmup_requests=1"]
    if args.expert_parallel:
        cmd += ["--set", "engine.expert_parallel=true"]
    if args.device == "cpu":
        cmd += ["--set", "engine.dtype=float32"]
    if args.num_kv_blocks:
        cmd += ["--set", f"engine.num_kv_blocks={args.num_kv_blocks}"]
    res: dict = {"answered": 0}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            end = time.monotonic() + args.serve_timeout
            while time.monotonic() < end and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:  # refused while starting, 503 until ready
                    pass
                time.sleep(1)
            res["ready_s"] = args.serve_timeout - (end - time.monotonic())
            if proc.poll() is not None:
                return res
            from openai import OpenAI

            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            t = time.perf_counter()
            out = client.chat.completions.create(model="deepseek-v3", max_tokens=32, temperature=0,
                                                 messages=[{"role": "user", "content": "Why is the sky blue?"}])
            msg = out.choices[0].message
            reasoning = getattr(msg, "reasoning_content", None) or (msg.model_extra or {}).get("reasoning_content")
            res.update(answered=int(out.usage.completion_tokens > 0), latency_s=time.perf_counter() - t,
                       completion_tokens=out.usage.completion_tokens, reasoning_chars=len(reasoning or ""),
                       content_chars=len(msg.content or ""), finish_reason=out.choices[0].finish_reason)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return res


# ---- main ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--expert-parallel", action="store_true", help="whole experts per rank (EP = TP)")
    ap.add_argument("--layers", type=int, default=0, help="num_hidden_layers (0: the model's 61)")
    ap.add_argument("--experts", type=int, default=0, help="n_routed_experts (0: the model's 256)")
    ap.add_argument("--tiny", action="store_true", help="the tiny V3 dimensions (CPU check)")
    ap.add_argument("--bf16", action="store_true", help="no quantization_config (bf16 random weights)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: from KV memory, up to max concurrency")
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=2048)
    ap.add_argument("--batch1-tokens", type=int, default=256)
    ap.add_argument("--mtp-tokens", type=int, default=1, help="num_speculative_tokens with MTP")
    ap.add_argument("--serve-max-num-seqs", type=int, default=16)
    ap.add_argument("--serve-timeout", type=float, default=900)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    mdir = model_dir(args, Path(tempfile.mkdtemp(prefix="v3-")))  # config + tokenizer only; not brought back
    cfg = json.loads((mdir / "config.json").read_text())
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    shape = (f"deepseek-v3 {cfg['num_hidden_layers']} layers, {cfg['n_routed_experts']} experts, hidden "
             f"{cfg['hidden_size']}, {'fp8' if 'quantization_config' in cfg else 'bf16'}, TP {args.tp}"
             f"{' EP' if args.expert_parallel else ''}")
    rows: list[dict] = []
    lines = [f"{shape} on {args.tp} x {device_name}"]

    def row(metric: str, value, unit: str, workload: str) -> None:
        rows.append({"date": datetime.now(UTC).date().isoformat(), "device": f"{args.tp}x {device_name}",
                     "commit": args.commit, "shape": shape, "workload": workload, "metric": metric,
                     "value": round(value, 3) if isinstance(value, float) else value, "unit": unit})
        lines.append(f"  {workload:<34} {metric:<32} {value:>12.4g} {unit}" if isinstance(value, float | int)
                     else f"  {workload:<34} {metric:<32} {value} {unit}")
        print(lines[-1], flush=True)
        # written as they come: a later phase that fails or runs out of time keeps the earlier figures
        with (args.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        (args.out / "table.txt").write_text("\n".join(lines) + "\n")

    vocab = cfg["vocab_size"]
    b1_prompt = prompts(1, 128, vocab, seed=1)[0]
    started = time.perf_counter()

    def base(engine) -> list[int]:
        """load, batch1, throughput on one engine; returns the batch-1 greedy continuation (mtp's oracle)."""
        row("start_s", time.perf_counter() - started, "s", "engine start (dummy weights, graphs)")
        reference: list[int] = []
        if "load" in phases:
            for rank, gib in enumerate(gpu_memory_used()):
                row(f"gpu{rank}_memory_used", gib, "GiB", "after start-up (weights, KV, graphs)")
            row("rank0_weight_bytes", weight_bytes(engine) / 2**30, "GiB", "weights + buffers held by rank 0")
            bm = engine.block_manager
            row("kv_capacity_tokens", bm.num_blocks * bm.block_size, "tokens", "KV cache (latent, replicated)")
            row("max_num_seqs", engine.max_num_seqs, "seqs", "engine batch capacity")
        # batch1 always runs when mtp follows: its tokens are the oracle's continuation
        if phases & {"batch1", "mtp"}:
            rate, out = batch1(engine, b1_prompt, args.batch1_tokens, args.device)
            reference = b1_prompt + out
            row("decode_tok_s_per_user", rate, "tok/s", f"batch 1, 128 -> {args.batch1_tokens}, no MTP")
        if "throughput" in phases:
            for c in args.concurrency:
                reqs = [(p, args.output_len) for p in prompts(c, args.input_len, vocab, seed=c)]
                res = run(engine, reqs, f"c{c}", args.device)
                out_tokens = sum(len(v) for v in res["done"].values())
                work = f"{args.input_len} in / {args.output_len} out, concurrency {c}"
                row("output_tok_s", out_tokens / res["wall"], "tok/s", work)
                row("total_tok_s", (out_tokens + c * args.input_len) / res["wall"], "tok/s", work)
                row("ttft_p50", percentile(res["ttft"], 0.5), "s", work)
                row("ttft_p99", percentile(res["ttft"], 0.99), "s", work)
                row("preemptions", engine.stats().num_preemptions, "total", work)
        return reference

    def mtp(engine, reference: list[int]) -> None:
        # warm-up: the verify and MTP shapes compile their kernels at first use (no graphs are captured)
        run(engine, [(prompts(1, 128, vocab, seed=2)[0], 16)], "warm", args.device)
        rate, out = batch1(engine, b1_prompt, args.batch1_tokens, args.device)
        s = engine.stats().spec_decode
        work = f"batch 1, 128 -> {args.batch1_tokens}, MTP k={args.mtp_tokens}"
        row("decode_tok_s_per_user", rate, "tok/s", work + " (real drafts: lower bound)")
        row("acceptance_rate", s.acceptance_rate, "ratio", work + " (real drafts)")
        row("greedy_identical", int(b1_prompt + out == reference), "bool", work + " vs no MTP")
        Oracle(engine.speculator, reference)
        before = engine.stats().spec_decode
        rate, out = batch1(engine, b1_prompt, args.batch1_tokens, args.device)
        s = engine.stats().spec_decode
        accepted = (s.num_accepted_tokens - before.num_accepted_tokens) / max(
            1, s.num_draft_tokens - before.num_draft_tokens)
        row("decode_tok_s_per_user", rate, "tok/s", work + " (always-agreeing drafts: upper bound)")
        row("acceptance_rate", accepted, "ratio", work + " (always-agreeing drafts)")
        row("greedy_identical", int(b1_prompt + out == reference), "bool", work + " oracle vs no MTP")

    reference: list[int] = []
    if phases & {"load", "batch1", "throughput", "mtp"}:
        reference = with_engine(engine_config(mdir, args), args.device, base)
    if "mtp" in phases:
        speculative = {"method": "mtp", "num_speculative_tokens": args.mtp_tokens}
        with_engine(engine_config(mdir, args, speculative=speculative), args.device,
                    lambda engine: mtp(engine, reference))
    if "serve" in phases:
        res = serve_check(mdir, args, args.out / "serve.log")
        row("openai_chat_answered", res.get("answered", 0), "bool", "deepfleet serve + openai client")
        for key in ("ready_s", "latency_s", "completion_tokens", "reasoning_chars", "content_chars"):
            if key in res:
                unit = "s" if key.endswith("_s") else "tokens" if key == "completion_tokens" else "chars"
                row(key, res[key], unit, "deepfleet serve + openai client")


if __name__ == "__main__":
    main()
