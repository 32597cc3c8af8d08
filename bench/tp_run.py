"""Tensor-parallel run (issue 19): TP=N against TP=1 in one session, random weights of a real shape, same seed.

    python bench/tp_run.py --shape 7b --tp 2 --out $OUT --commit $(git rev-parse --short HEAD)   # nvidia-h200-x2
    python bench/tp_run.py --shape tiny --tp 2 --device cpu --num-requests 16 --out /tmp/tp       # CPU, gloo: check

Phases (each TP size builds its engine once and runs them all, then it is closed):
  parity    greedy tokens of 8 prompts x 64 new tokens, TP=N vs TP=1 (bf16 on GPU: the first divergence and the
            TP=1 top-2 logit gap there are reported, since a different reduction order may flip a near tie; with
            --fp32-parity the same again in float32, where the tokens must be identical)
  batch1    batch-1 decode tok/s, prompt 128 -> 128
  offline   128 -> 128 x --num-requests (2,000 on the GPU run) tok/s
  sharegpt  a ShareGPT-like mix (lognormal prompt/output lengths, seeded) tok/s
  allreduce device time of the all-reduce kernels per batch-1 decode step (torch.profiler on rank 0)
  serve     `deepfleet serve --tensor-parallel-size N` answers the official openai client; then one worker is
            killed and the server must exit within 60 s naming the rank
The NCCL environment is the one the `nccl` role renders: roles/nccl/templates/nccl.conf.j2 with the role's
defaults for one node, written to OUT/nccl.conf and read by the runtime through DEEPFLEET_NCCL_CONF.

Writes OUT/results.jsonl (bench/results.jsonl format), OUT/table.txt, OUT/serve.log, OUT/nccl.conf."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from server_wait import wait_ready

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("parity", "batch1", "offline", "sharegpt", "allreduce", "serve")


# ---- set-up ----------------------------------------------------------------------------------------------------
def render_nccl_conf(out: Path) -> Path:
    """The role's template with its defaults for a single node (no RDMA HCAs; the ring/tree rule for 1 node)."""
    import jinja2
    import yaml

    sys.path.insert(0, str(ROOT / "roles/nccl/filter_plugins"))
    from nccl_rules import nccl_algo

    defaults = yaml.safe_load((ROOT / "roles/nccl/defaults/main.yml").read_text())
    values = {k: v for k, v in defaults.items() if not isinstance(v, str) or "{{" not in v}
    values.update(ansible_managed="rendered by bench/tp_run.py from roles/nccl (defaults, 1 node)",
                  nccl_cluster_nodes=1, nccl_effective_algo=nccl_algo(1, defaults["nccl_tree_min_nodes"])
                  if defaults["nccl_algo"] == "auto" else defaults["nccl_algo"])
    template = jinja2.Template((ROOT / "roles/nccl/templates/nccl.conf.j2").read_text(), trim_blocks=True,
                               undefined=jinja2.StrictUndefined)
    path = out / "nccl.conf"
    path.write_text(template.render(**values))
    return path


def model_dir(shape: str, root: Path) -> Path:
    if shape == "tiny":
        from deepfleet.models.tiny import make_tiny_model

        return make_tiny_model(root / "tiny", "qwen2")
    from deepfleet.engine.benchmark import write_shape_dir

    return write_shape_dir(shape, root / shape)


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def sharegpt_like(n: int, vocab: int, seed: int, max_len: int) -> list[tuple[list[int], int]]:
    """(prompt, output length) pairs with ShareGPT's long-tailed shape: lognormal lengths, medians ~170 prompt and
    ~200 output tokens, clipped to [4, max_len / 2]. Replace with bench/throughput.py's mix once it lands there."""
    g = torch.Generator().manual_seed(seed)
    cap = max_len // 2

    def lengths(median: float) -> list[int]:
        x = torch.empty(n).log_normal_(math.log(median), 0.9, generator=g)
        return x.clamp(4, cap).long().tolist()

    return [(torch.randint(100, vocab - 100, (p,), generator=g).tolist(), o)
            for p, o in zip(lengths(170), lengths(200), strict=True)]


# ---- one engine, every phase --------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_requests(engine, reqs, tag: str, device: str) -> tuple[float, dict]:
    from deepfleet.engine.sampling_params import SamplingParams

    for i, (p, out_len) in enumerate(reqs):
        engine.add_request(f"{tag}-{i}", p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=out_len))
    sync(device)
    t = time.perf_counter()
    done, tokens = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
                tokens += len(o.outputs[0].token_ids)
    sync(device)
    return tokens / (time.perf_counter() - t), done


def allreduce_per_step(engine, vocab: int, device: str, steps: int = 32) -> tuple[float, float]:
    """(all-reduce device ms per decode step, whole decode step ms) from a profiled batch-1 run on rank 0."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        run_requests(engine, [(prompts(1, 16, vocab, seed=9)[0], steps)], "ar", device)
        wall = time.perf_counter() - t
    total = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        if "allreduce" in name or "all_reduce" in name:
            if device == "cuda":
                total += e.self_device_time_total if "nccl" in name else 0.0  # kernels, not their CPU launches
            elif name.startswith("gloo"):
                total += e.cpu_time_total
    return total / 1e3 / steps, 1e3 * wall / steps


def bench_one(mdir: Path, tp: int, args, dtype: str, phases: set[str]) -> dict:
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(mdir), dtype=dtype, device=args.device, load_format="dummy",
                                    tensor_parallel_size=tp, max_model_len=args.max_model_len,
                                    enforce_eager=args.enforce_eager))
    res: dict = {"init_s": time.perf_counter() - t0}
    vocab = engine.runner.cfg.vocab_size
    try:
        run_requests(engine, [(p, 8) for p in prompts(4, 128, vocab, seed=1)], "warm", args.device)
        if "parity" in phases:
            reqs = [(p, 64) for p in prompts(8, 128, vocab, seed=2)]
            res["parity"] = run_requests(engine, reqs, "parity", args.device)[1]
            res["parity_gaps"] = top2_gaps(engine, reqs, res["parity"]) if tp == 1 else None
        if "batch1" in phases:
            run_requests(engine, [(prompts(1, 128, vocab, seed=3)[0], 16)], "warm1", args.device)
            res["batch1"] = run_requests(engine, [(prompts(1, 128, vocab, seed=4)[0], 128)], "b1", args.device)[0]
        if "offline" in phases:
            reqs = [(p, 128) for p in prompts(args.num_requests, 128, vocab, seed=5)]
            res["offline"] = run_requests(engine, reqs, "off", args.device)[0]
        if "sharegpt" in phases:
            reqs = sharegpt_like(max(1, args.num_requests // 2), vocab, 6, engine.max_model_len)
            res["sharegpt"] = run_requests(engine, reqs, "sg", args.device)[0]
        if "allreduce" in phases:
            res["allreduce_ms"], res["decode_step_ms"] = allreduce_per_step(engine, vocab, args.device)
        res["preemptions"] = engine.stats().num_preemptions
    finally:
        if hasattr(engine.runner, "close"):
            engine.runner.close()
        engine = None
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return res


def top2_gaps(engine, reqs, done) -> dict[str, list[float]]:
    """TP=1: per parity request, the gap between its best and second-best logit at each generated position, by
    re-running the greedy sequence one step at a time through the same engine's model (cheap: 8 x 64 steps)."""
    from deepfleet.engine.sampling_params import SamplingParams

    gaps: dict[str, list[float]] = {}
    sampler = engine.sampler
    recorded: list[torch.Tensor] = []

    def record(logits, states):
        recorded.append(logits.float().topk(2, dim=-1).values.cpu())
        return type(sampler).__call__(sampler, logits, states)

    engine.sampler = record
    try:
        for i, (p, n) in enumerate(reqs):
            recorded.clear()
            engine.add_request(f"gap-{i}", p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=n))
            while engine.has_unfinished_requests():
                engine.step()
            gaps[f"parity-{i}"] = [float(v[0, 0] - v[0, 1]) for v in recorded]
    finally:
        engine.sampler = sampler
    return gaps


def compare(ref: dict, got: dict, gaps: dict | None) -> dict:
    same = sum(ref[k] == got[k] for k in ref)
    first, gap_there = [], []
    for k in ref:
        diff = next((i for i, (a, b) in enumerate(zip(ref[k], got[k], strict=True)) if a != b), None)
        if diff is not None:
            first.append(diff)
            if gaps:
                gap_there.append(gaps[k][diff])
    return {"identical": same, "of": len(ref), "first_divergence": min(first) if first else None,
            "max_gap_at_divergence": max(gap_there) if gap_there else None}


# ---- serve --------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_below(pid: int) -> list[int]:
    def ppid(p: int) -> int:
        return int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])

    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"deepfleet.distributed.worker" in (entry / "cmdline").read_bytes() \
                    and ppid(ppid(int(entry.name))) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def serve_check(mdir: Path, tp: int, args, dtype: str, log_path: Path) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "deepfleet", "serve", str(mdir), "--host", "127.0.0.1", "--port", str(port),
           "--tensor-parallel-size", str(tp), "--served-model-name", "tp-bench", "--set", "engine.load_format=dummy",
           "--set", f"engine.device={args.device}", "--set", f"engine.dtype={dtype}",
           "--set", f"engine.max_model_len={args.max_model_len}", "--set", "warmup_requests=1"]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    res = {"answered": 0, "rank_named": 0, "exit_s": None}
    try:
        import httpx

        wait_ready(port, proc, args.serve_timeout, interval=1.0)  # not ready in time: the request below tells
        if proc.poll() is not None:
            return res
        try:
            from openai import OpenAI

            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            out = client.completions.create(model="tp-bench", prompt="Hello", max_tokens=8)
            res["answered"] = int(out.usage.completion_tokens == 8)
            res["client"] = "openai"
        except ImportError:  # the device may lack the openai package: say so, answer with httpx
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": "tp-bench", "prompt": "Hello", "max_tokens": 8})
            res["answered"] = int(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8)
            res["client"] = "httpx (openai not installed)"
        workers = _workers_below(proc.pid)
        res["workers"] = len(workers)
        if workers:
            t = time.monotonic()
            os.kill(workers[0], signal.SIGKILL)
            proc.wait(timeout=60)
            res["exit_s"] = time.monotonic() - t
            text = log_path.read_text()
            res["rank_named"] = int("tensor-parallel worker rank 1" in text and "killed by signal 9" in text)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    return res


# ---- main ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="7b", help="7b, 1.5b (engine/benchmark.py) or tiny (CPU check)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--fp32-parity", action="store_true", help="also compare greedy tokens in float32")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--serve-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["DEEPFLEET_NCCL_CONF"] = str(render_nccl_conf(args.out))
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        mdir = model_dir(args.shape, Path(tmp))
        bench_phases = phases - {"serve"}
        one = bench_one(mdir, 1, args, dtype, bench_phases)
        many = bench_one(mdir, args.tp, args, dtype, bench_phases)
        parity32 = None
        if args.fp32_parity and "parity" in phases and dtype != "float32":
            a = bench_one(mdir, 1, args, "float32", {"parity"})
            b = bench_one(mdir, args.tp, args, "float32", {"parity"})
            parity32 = compare(a["parity"], b["parity"], a["parity_gaps"])
        serve = serve_check(mdir, args.tp, args, dtype, args.out / "serve.log") if "serve" in phases else None
    rows = []

    def row(metric: str, value, unit: str, workload: str) -> None:
        rows.append({"date": datetime.now(UTC).isoformat(timespec="seconds"), "device": f"{args.tp}x {device_name}",
                     "commit": args.commit, "shape": args.shape, "workload": workload, "metric": metric,
                     "value": value, "unit": unit})

    if "parity" in phases:
        p = compare(one["parity"], many["parity"], one["parity_gaps"])
        row(f"greedy_identical_tp{args.tp}_vs_tp1_{dtype}", p["identical"], f"of {p['of']} requests",
            "8 prompts 128 -> 64 greedy, dummy weights seed 0")
        row("first_divergence_token", p["first_divergence"], "token index", "parity")
        row("tp1_top2_gap_at_divergence", p["max_gap_at_divergence"], "logit", "parity")
        if parity32:
            row(f"greedy_identical_tp{args.tp}_vs_tp1_float32", parity32["identical"], f"of {parity32['of']} requests",
                "8 prompts 128 -> 64 greedy, dummy weights seed 0")
    for key, workload in (("batch1", "batch-1 decode 128 -> 128"), ("offline", f"128 -> 128 x {args.num_requests}"),
                          ("sharegpt", f"ShareGPT-like x {max(1, args.num_requests // 2)}")):
        if key in one:
            row(f"{key}_tp1", one[key], "tok/s", workload)
            row(f"{key}_tp{args.tp}", many[key], "tok/s", workload)
            row(f"{key}_speedup", many[key] / one[key], "x", workload)
    if "allreduce_ms" in many:
        row(f"allreduce_per_decode_step_tp{args.tp}", many["allreduce_ms"], "ms", "batch-1 decode, profiled rank 0")
        row(f"decode_step_tp{args.tp}", many["decode_step_ms"], "ms", "batch-1 decode, profiled rank 0")
    if serve:
        row("serve_openai_answered", serve["answered"], serve.get("client", "none"), f"serve --tensor-parallel-size "
            f"{args.tp}")
        row("serve_killed_worker_rank_named", serve["rank_named"], "bool", "SIGKILL of worker rank 1")
        row("serve_exit_after_kill", serve["exit_s"], "s", "SIGKILL of worker rank 1")
    with (args.out / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    def shown(v) -> str:
        return str(round(v, 3) if isinstance(v, float) else v)

    table = "\n".join(f"{r['metric']:<44}{shown(r['value']):>14}  {r['unit']}" for r in rows)
    header = (f"tp_run {args.shape} tp={args.tp} {device_name} commit {args.commit}; init s: tp1 {one['init_s']:.1f}, "
              f"tp{args.tp} {many['init_s']:.1f}; preemptions tp1 {one.get('preemptions')} tp{args.tp} "
              f"{many.get('preemptions')}")
    (args.out / "table.txt").write_text(header + "\n" + table + "\n")
    print(header)
    print(table)


if __name__ == "__main__":
    main()
