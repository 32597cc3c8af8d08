"""Host CPU time of the engine's decode step, on the CPU (no GPU needed): the real `LLMEngine.step` loop at
--seqs decoding sequences of the tiny test model, the model's own forward timed and subtracted.

    python bench/host_cpu.py --seqs 256                          # the deepfleet on PYTHONPATH
    python bench/host_cpu.py --seqs 256 --trees new=. base=/tmp/base --out bench/results.jsonl

With --trees every tree runs in its own process (PYTHONPATH=TREE/runtime:TREE), alternating, --repeats times
each; the table shows each tree's best repeat (least disturbed by other work on the machine) and, for two trees,
the median ratio of their host totals over the back-to-back pairs.

Phases per step (ms), as engine/benchmark.py Bench.host_profile names them: schedule (Scheduler.schedule),
prepare_and_launch (ModelRunner.execute minus the model's forward and LM head), sample_launch (Sampler.sample:
on CPU the draw itself, a greedy argmax of a [seqs, 544] tensor), take_in_tokens (the engine's take-in of the
previous step's tokens) and other (the rest of step(): output objects, block bookkeeping). Requests: 32-token
prompts, greedy, ignore_eos; workloads `offline` (reported only when finished, as LLM.generate asks),
`stream` (reported every step, as the server's streams) and `stop` (two stop strings that never match, every
step's text checked, offline).

--stub-forward replaces the model's forward and LM head by fixed outputs (the greedy token is then the same every
step): the host loop's objects then stay in the CPU's caches from one step to the next, as on a GPU host, where the
forward runs on the device; an eager forward on the same CPU evicts them, which makes every pass over the batch's
sequences after it slower than it is beside a GPU."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PHASES = {"schedule": ("scheduler", "schedule"), "prepare_and_launch": ("runner", "execute"),
          "sample_launch": ("sampler", "sample")}
TAKE_IN = ("_take_in", "_resolve")  # the engine's take-in method (its older name second)
WORKLOADS = ("offline", "stream", "stop")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _engine(model_dir: Path, seqs: int):
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", max_num_seqs=seqs,
                                  max_num_batched_tokens=max(2048, 32 * seqs), num_kv_blocks=seqs * 32))


def _add(engine, seqs: int, workload: str, tag: str) -> None:
    import inspect

    import numpy as np

    from deepfleet.engine.sampling_params import SamplingParams

    rng = np.random.default_rng(3)
    stop = ["\x00never\x00", "\x01also never"] if workload == "stop" else None
    offline = {"stream": False} if workload != "stream" and "stream" in inspect.signature(
        engine.add_request).parameters else {}  # (a tree whose engine reports every request every step)
    for i in range(seqs):
        prompt = rng.integers(10, 500, 32).tolist()
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=400,
                                                               stop=stop), **offline)


def _stub_forward(engine) -> None:
    import torch

    model, cfg = engine.runner.model, engine.runner.cfg
    rows = engine.runner.buffers.max_tokens
    hidden = torch.zeros(rows, cfg.hidden_size)
    logits = torch.randn(rows, cfg.vocab_size, generator=torch.Generator().manual_seed(0))
    model.forward = lambda input_ids, *args: hidden[: len(input_ids)]
    model.compute_logits = lambda h, out=None: logits[: len(h)]


def measure(model_dir: Path, seqs: int, steps: int, workload: str, stub: bool = False) -> dict[str, float]:
    """One engine, `seqs` sequences through their prefills, then `steps` timed decode steps: ms per step."""
    import torch

    torch.set_num_threads(1)
    e = _engine(model_dir, seqs)
    if stub:
        _stub_forward(e)
    parts: dict[str, float] = defaultdict(float)
    clock = time.thread_time  # CPU time of this thread: other work on the machine does not count

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                parts[key] += clock() - t

        setattr(obj, name, wrapper)

    for key, (owner, name) in PHASES.items():
        timed(getattr(e, owner) if owner != "runner" else e.runner, name, key)
    timed(e, next(n for n in TAKE_IN if hasattr(e, n)), "take_in_tokens")
    model = e.runner.model
    timed(model, "forward", "model")
    timed(model, "compute_logits", "model")
    _add(e, seqs, workload, "w")
    while len(e.scheduler.running) < seqs or any(s.num_uncomputed > 1 for s in e.scheduler.running):
        e.step()
    for _ in range(5):
        e.step()
    parts.clear()
    t = clock()
    for _ in range(steps):
        e.step()
    wall = clock() - t
    assert all(not s.is_finished for s in e.scheduler.running) and len(e.scheduler.running) == seqs
    model_s = parts.pop("model")
    parts["prepare_and_launch"] -= model_s
    out = {k: 1e3 * v / steps for k, v in parts.items()}
    out["other"] = 1e3 * (wall - model_s) / steps - sum(out.values())
    out["host_total"] = 1e3 * (wall - model_s) / steps
    out["model_forward"] = 1e3 * model_s / steps
    return out


def _child(args) -> None:
    from deepfleet.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model(Path(tmp) / "qwen2", "qwen2")
        print(json.dumps({w: measure(model_dir, args.seqs, args.steps, w, args.stub_forward) for w in args.workloads}))


def _run_tree(tree: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}/runtime:{tree}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--seqs", str(args.seqs), "--steps",
           str(args.steps), "--workloads", *args.workloads, *(["--stub-forward"] if args.stub_forward else [])]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--trees", nargs="+", metavar="NAME=PATH", default=None)
    p.add_argument("--stub-forward", action="store_true", help="fixed forward outputs: caches as on a GPU host")
    p.add_argument("--out", type=Path, default=None, help="append records (bench/results.jsonl format)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    trees = dict(t.split("=", 1) for t in args.trees) if args.trees else {"this": str(Path.cwd())}
    best: dict[str, dict[str, dict[str, float]]] = {}
    totals: dict[str, list[list[float]]] = {w: [] for w in args.workloads}  # per repeat: each tree's host total
    for _ in range(args.repeats):
        runs = {name: _run_tree(Path(path).resolve(), args) for name, path in trees.items()}
        for w in args.workloads:
            totals[w].append([runs[name][w]["host_total"] for name in trees])
            for name in trees:
                kept = best.setdefault(name, {}).get(w)
                if kept is None or runs[name][w]["host_total"] < kept["host_total"]:
                    best[name][w] = runs[name][w]
    keys = ["schedule", "prepare_and_launch", "sample_launch", "take_in_tokens", "other", "host_total",
            "model_forward"]
    device, today = f"CPU: {cpu_name()}", datetime.date.today().isoformat()
    print(f"{args.seqs} decoding sequences, ms per step (best of {args.repeats} x {args.steps} steps), {device}")
    print(f"{'workload':<9}{'tree':<8}" + "".join(f"{k:>20}" for k in keys))
    records, stub = [], " stub forward" if args.stub_forward else ""
    for w in args.workloads:
        for name, path in trees.items():
            phases = best[name][w]
            print(f"{w:<9}{name:<8}" + "".join(f"{phases[k]:>20.3f}" for k in keys))
            commit = _commit(Path(path))
            records += [dict(date=today, device=device, commit=commit, shape="tiny qwen2 (tests) fp32",
                             workload=f"host cpu {args.seqs} seqs {w}{stub}", metric=f"host_{k}_ms" if k != "host_total"
                             and k != "model_forward" else f"{k}_ms", value=round(phases[k], 4), unit="ms")
                        for k in keys]
    if len(trees) == 2:  # the machine's speed drifts: the ratio within each back-to-back pair is steadier
        first, second = trees
        for w in args.workloads:
            ratios = sorted(a / b for a, b in totals[w])
            print(f"{w}: host total {first}/{second} per repeat, median {statistics.median(ratios):.3f} "
                  f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    if args.out is not None:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
