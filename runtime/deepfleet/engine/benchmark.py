"""Engine benchmarks on DeepSeek-R1-Distill-Qwen shapes with random weights (bf16, GPU), the workloads users
compare engines on, each as one JSON record (date, device, commit, shape, workload, metric, value, unit).
Used by `deepfleet bench` and bench/throughput.py.

Workloads (all greedy with `ignore_eos`, so every request generates exactly its output length):
- fixed: 2,000 requests, 128 random prompt tokens -> 128 new tokens, all submitted at once (offline).
- sharegpt: 1,000 requests with a long-tailed length mix like ShareGPT's (seeded): prompt lengths log-normal
  around a median of 215 (sigma 0.9, clipped to 8..2048: mean ~295), output lengths log-normal around a median of
  170 (sigma 0.9, clipped to 4..1024: mean ~245), drawn independently.
- prefix: 1,000 requests sharing one 1,024-token prefix, each with its own 16..64-token tail -> 128 new tokens.
- long: 16 prompts of 8,192 tokens -> 64 new tokens; plus the time of one 8,192-token prefill alone, as
  achieved TFLOP/s against the device's measured bf16 matmul rate.
- latency: TTFT of one 512-token prompt alone (median of the last 10 of 12), batch-1 decode ms/token at 512 context.
- host: a profile of the loop at 64 and at 256 running sequences: per-step wall time, the decode graph's GPU
  time, and the host's time in step() that is not waiting (host_total), by part: scheduling, input preparation +
  launches, sampling launches, taking tokens in (detokenization, stops), other (output objects, bookkeeping).
  Waiting is left out: for the step's tokens, and what the CUDA-graph launch call spends beyond an idle-GPU
  launch (it can block while the GPU's queue is full; both are reported).
HBM floor of batch-1 decode: the bytes one decode step reads (every weight matrix once, the LM head, one row of
the input embedding, the KV cache of the context) over the measured device copy bandwidth."""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

SHAPES = {  # DeepSeek-R1-Distill-Qwen-1.5B / -7B (Qwen2)
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
WORKLOADS = ("latency", "fixed", "sharegpt", "prefix", "long", "host")
MAX_MODEL_LEN = 8192 + 256  # the long prompts and their outputs fit
HOST_PROFILE_BATCHES = (64, 256)  # running sequences of the host workload's profiles


BENCH_TRAINED_TOKENS = 544  # the byte-level BPE the bench tokenizer is trained to (models/tiny.py)


def bench_tokenizer(vocab_size: int):
    """The trained byte-level BPE, its vocabulary extended with word tokens (" w544", " w545", …) up to the
    model's vocab_size, so every id a random-weight model emits decodes to text, as a real tokenizer's do: otherwise
    99.6% of the generated ids would decode to nothing, which the detokenizer skips, and the host profile would not
    count detokenization. Encoding is unchanged (no merge reaches the added words); the trained and special tokens
    keep their ids."""
    from tokenizers import Tokenizer

    from deepfleet.models.tiny import build_tokenizer

    spec = json.loads(build_tokenizer(BENCH_TRAINED_TOKENS).to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})  # (else reloading renumbers them)
    vocab.update({f"\u0120w{i}": i for i in range(BENCH_TRAINED_TOKENS, vocab_size)})  # "Ġ": a leading space
    return Tokenizer.from_str(json.dumps(spec))


def write_shape_dir(shape: str, out: Path, max_model_len: int = MAX_MODEL_LEN) -> Path:
    from deepfleet.models.tiny import CONFIGS

    cfg = {**CONFIGS["qwen2"], **SHAPES[shape], "max_position_embeddings": max_model_len, "torch_dtype": "bfloat16",
           "rope_theta": 10000.0, "eos_token_id": None, "bos_token_id": None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    bench_tokenizer(cfg["vocab_size"]).save(str(out / "tokenizer.json"))
    return out


# ---- device figures ------------------------------------------------------------------------------------------------
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


def matmul_rate(n: int = 8192) -> float:
    """Measured bf16 dense matmul FLOP/s (n x n x n)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def decode_step_bytes(shape: str, context: int, batch: int = 1, quantization: str | None = None) -> int:
    """Bytes one decode step really reads (bf16): all layer weights and the LM head once, one embedding row per
    sequence (not the table), and each sequence's KV cache over its context. Under FP8 the layers' projections
    are 1 byte per weight (their block scales, 1/16384 of that, are left out); the LM head stays bf16."""
    cfg = SHAPES[shape]
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = head_dim * cfg["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * i + 2 * h  # qkv (+bias), o, gate/up/down, norms
    weights = layers * per_layer + v * h + h  # + LM head + final norm
    kv_cache = layers * 2 * kv * context
    total = 2 * (weights + batch * (h + kv_cache))
    if quantization == "fp8":
        total -= layers * (h * (h + 2 * kv) + h * h + 3 * h * i)  # the projections' second byte
    return total


def prefill_flops(shape: str, tokens: int) -> float:
    """Dense FLOPs of a causal prefill: 2 x matmul parameters per token, plus attention (QK^T and PV, causal)."""
    cfg = SHAPES[shape]
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    params = layers * (h * (h + 2 * kv) + h * h + 3 * h * i)
    attention = layers * 2 * 2 * h * tokens * tokens / 2
    return 2 * params * tokens + attention + 2 * v * h  # LM head for the last token only


# ---- workloads -----------------------------------------------------------------------------------------------------
def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(10, 540, n).tolist()  # trained tokens of the bench tokenizer


def sharegpt_like(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    ins = np.clip(rng.lognormal(math.log(215), 0.9, n), 8, 2048).astype(int)
    outs = np.clip(rng.lognormal(math.log(170), 0.9, n), 4, 1024).astype(int)
    return [(_ids(rng, int(a)), int(b)) for a, b in zip(ins, outs, strict=True)]


def fixed(n: int, prompt_len: int, output_len: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(_ids(rng, prompt_len), output_len) for _ in range(n)]


def shared_prefix(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    prefix = _ids(rng, 1024)
    return [(prefix + _ids(rng, int(rng.integers(16, 65))), 128) for _ in range(n)]


class Bench:
    def __init__(self, shape: str, engine, commit: str, device: str, quantization: str | None = None):
        self.shape, self.engine, self.commit, self.device = shape, engine, commit, device
        self.quantization = quantization
        self.records: list[dict] = []
        self._n = 0

    def record(self, workload: str, metric: str, value: float, unit: str) -> None:
        self.records.append(dict(date=datetime.date.today().isoformat(), device=self.device, commit=self.commit,
                                 shape=f"R1-Distill-Qwen-{self.shape.upper()} {self.quantization or 'bf16'}",
                                 workload=workload,
                                 metric=metric, value=round(float(value), 4), unit=unit))

    def offline(self, requests: list[tuple[list[int], int]], steps: list | None = None) -> tuple[float, float, int]:
        """All requests at once; returns (seconds, output tokens, prompt tokens). With `steps`, appends (rows,
        tokens, seconds) per engine step: what the scheduler gave it and the wall time of the step() call."""
        from deepfleet.engine.sampling_params import SamplingParams

        e = self.engine
        for prompt, out_len in requests:
            self._n += 1
            e.add_request(f"b{self._n}", prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=out_len),
                          stream=False)  # as LLM.generate
        schedule, shapes = e.scheduler.schedule, []
        if steps is not None:  # the step's shape, as the scheduler hands it to the engine (nothing else changes)
            def recorded():
                out = schedule()
                shapes.append((len(out.scheduled), out.num_tokens))
                return out

            e.scheduler.schedule = recorded
        torch.cuda.synchronize()
        t, tokens = time.perf_counter(), 0
        try:
            while e.has_unfinished_requests():
                begin = time.perf_counter()
                tokens += sum(len(o.outputs[0].token_ids) for o in e.step() if o.finished)
                if steps is not None:
                    steps.append((*shapes[-1], time.perf_counter() - begin))
            torch.cuda.synchronize()
        finally:
            e.scheduler.schedule = schedule
        return time.perf_counter() - t, tokens, sum(len(p) for p, _ in requests)

    def throughput(self, workload: str, requests) -> None:
        # warm-up (prefill kernels of these shapes) on reversed prompts: no prefix-cache head start
        self.offline([(p[::-1], o) for p, o in requests[: min(64, len(requests))]])
        before = self.engine.stats()
        steps: list[tuple[int, int, float]] = []
        seconds, out_tokens, in_tokens = self.offline(requests, steps)
        stats = self.engine.stats()
        self.record(workload, "output_tok_s", out_tokens / seconds, "tok/s")
        self.record(workload, "total_tok_s", (out_tokens + in_tokens) / seconds, "tok/s")
        self.record(workload, "requests", len(requests), "requests")
        self.record(workload, "preemptions", stats.num_preemptions - before.num_preemptions, "count")
        hits = stats.prefix_cache_hits - before.prefix_cache_hits
        queries = stats.prefix_cache_queries - before.prefix_cache_queries
        if queries:
            self.record(workload, "prefix_hit_rate", 100 * hits / queries, "percent")
        # where the time went: steps with prompt tokens (prefill chunks, decodes riding along) vs decode-only steps
        for kind, mine in (("prefill", [s for s in steps if s[1] > s[0]]), ("decode", [s for s in steps
                                                                                     if s[1] == s[0]])):
            self.record(workload, f"{kind}_steps", len(mine), "steps")
            self.record(workload, f"{kind}_steps_s", sum(s[2] for s in mine), "s")
            if mine:
                self.record(workload, f"{kind}_step_rows_mean", statistics.mean(s[0] for s in mine), "sequences")
                self.record(workload, f"{kind}_step_tokens_mean", statistics.mean(s[1] for s in mine), "tokens")

    def latency(self, bandwidth: float) -> None:
        from deepfleet.engine.sampling_params import SamplingParams

        e, rng = self.engine, np.random.default_rng(7)
        ttfts = []
        for _ in range(12):
            self._n += 1
            e.add_request(f"t{self._n}", _ids(rng, 512), SamplingParams(temperature=0, ignore_eos=True, max_tokens=1))
            torch.cuda.synchronize()
            t = time.perf_counter()
            while not any(o.outputs[0].token_ids for o in e.step()):
                pass
            ttfts.append(time.perf_counter() - t)
            while e.has_unfinished_requests():
                e.step()
        self.record("latency", "ttft_512_ms", 1e3 * statistics.median(ttfts[2:]), "ms")
        steps = 256
        self._n += 1
        e.add_request(f"d{self._n}", _ids(rng, 512), SamplingParams(temperature=0, ignore_eos=True, max_tokens=steps))
        times = []
        while e.has_unfinished_requests():
            if e.step():
                times.append(time.perf_counter())
        per_token = (times[-1] - times[16]) / (len(times) - 17)  # steady state: after the first tokens
        floor = decode_step_bytes(self.shape, 512 + steps // 2, quantization=self.quantization) / bandwidth
        self.record("latency", "batch1_ms_per_token", 1e3 * per_token, "ms")
        self.record("latency", "batch1_tok_s", 1 / per_token, "tok/s")
        self.record("latency", "batch1_hbm_floor_ms", 1e3 * floor, "ms")
        self.record("latency", "batch1_of_hbm_floor", 100 * floor / per_token, "percent")

    def long_prefill(self, rate: float) -> None:
        from deepfleet.engine.sampling_params import SamplingParams

        e, rng = self.engine, np.random.default_rng(11)
        n = 8192
        for i in range(3):  # the first one warms up; the faster of the other two
            self._n += 1
            e.add_request(f"p{self._n}", _ids(rng, n), SamplingParams(temperature=0, ignore_eos=True, max_tokens=1))
            torch.cuda.synchronize()
            t = time.perf_counter()
            while e.has_unfinished_requests():
                e.step()
            torch.cuda.synchronize()
            if i == 1:
                first = time.perf_counter() - t
        seconds = min(first, time.perf_counter() - t)
        achieved = prefill_flops(self.shape, n) / seconds
        self.record("long", "prefill_8k_ms", 1e3 * seconds, "ms")
        self.record("long", "prefill_8k_tflops", achieved / 1e12, "TFLOP/s")
        self.record("long", "prefill_8k_of_matmul_rate", 100 * achieved / rate, "percent")
        self.throughput("long", [(_ids(rng, n), 64) for _ in range(16)])

    def host_profile(self, batch: int = 256) -> None:
        """Host time inside the engine step by part, against the step's wall time in steady state and the decode
        graph's own GPU time. Waiting is not host work: the wait for the tokens (the event) is left out, and so is
        what the CUDA-graph launch call spends beyond a launch with the GPU idle (the call can block while the
        GPU's queue is full: then it measures the GPU, not the host). The requests are offline ones (stream=False,
        as LLM.generate adds them: reported once they end, text decoded then). Records of workload "host <batch>
        seqs"."""
        e = self.engine
        parts: dict[str, float] = defaultdict(float)
        originals = {}

        def timed(obj, name, key):
            fn = getattr(obj, name)
            originals[(obj, name)] = fn

            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    parts[key] += time.perf_counter() - t

            setattr(obj, name, wrapper)

        from deepfleet.engine import sampler as sampler_mod

        sync = sampler_mod.SampleResult.wait
        waited = [0.0]

        def wait(self_):  # the wait for the step's tokens: not host work
            t = time.perf_counter()
            try:
                return sync(self_)
            finally:
                waited[0] += time.perf_counter() - t

        requests = fixed(batch, 128, 384, seed=21)
        self.offline(requests[:8])
        replay = torch.cuda.CUDAGraph.replay
        launched = [0.0]

        def timed_replay(graph):  # cudaGraphLaunch: inside prepare_and_launch, reported on its own as well
            t = time.perf_counter()
            try:
                return replay(graph)
            finally:
                launched[0] += time.perf_counter() - t

        torch.cuda.CUDAGraph.replay = timed_replay
        timed(e.scheduler, "schedule", "schedule")
        timed(e.runner, "execute", "prepare_and_launch")
        timed(e.sampler, "sample", "sample_launch")
        timed(e, "_resolve", "take_in_tokens")
        sampler_mod.SampleResult.wait = wait
        try:
            from deepfleet.engine.sampling_params import SamplingParams

            for prompt, out_len in requests:
                self._n += 1
                e.add_request(f"h{self._n}", prompt, SamplingParams(temperature=0, ignore_eos=True, max_tokens=out_len),
                              stream=False)  # offline, as LLM.generate: outputs of finished requests only
            while len(e.scheduler.running) < batch or any(s.num_uncomputed > 1 for s in e.scheduler.running):
                e.step()  # through the prefills
            for key in list(parts):
                parts[key] = 0.0
            waited[0] = launched[0] = 0.0
            torch.cuda.synchronize()
            # every running sequence decodes one token per step: stop before the first ends (a bound set once, so
            # the loop itself adds no per-sequence work to the steps it times)
            steps = min(200, *(380 - len(s.output_token_ids) for s in e.scheduler.running))
            torch.cuda.set_sync_debug_mode("warn")  # a synchronizing call inside step() shows in the log
            t = time.perf_counter()
            for _ in range(steps):
                e.step()
            wall = time.perf_counter() - t
            torch.cuda.set_sync_debug_mode(0)
            profile, waited_s, launch_s = defaultdict(float, parts), waited[0], launched[0]  # (not the drain)
            torch.cuda.CUDAGraph.replay = replay
            graph_gpu_s, idle_launch_s = _graph_times(e.runner, len(e.scheduler.running))
            while e.has_unfinished_requests():
                e.step()
        finally:
            sampler_mod.SampleResult.wait = sync
            torch.cuda.CUDAGraph.replay = replay
            for obj, name in originals:
                delattr(obj, name)  # back to the class methods
        w = f"host {batch} seqs"
        blocked_s = max(0.0, launch_s - steps * idle_launch_s)  # the launch call waiting for the GPU's queue
        host = wall - waited_s - blocked_s  # all of step() that is not waiting (the loop only calls step())
        self.record(w, "decode_step_ms", 1e3 * wall / steps, "ms")
        self.record(w, "decode_graph_gpu_ms", 1e3 * graph_gpu_s, "ms")  # the step's forward alone, on the GPU
        profile["take_in_tokens"] -= waited_s
        profile["prepare_and_launch"] -= blocked_s
        profile["other"] = host - sum(profile.values())  # output objects, deadlines, block bookkeeping
        for key, value in profile.items():
            self.record(w, f"host_{key}_ms", 1e3 * value / steps, "ms")
        self.record(w, "host_graph_launch_call_ms", 1e3 * launch_s / steps, "ms")  # the call, blocking included
        self.record(w, "host_graph_launch_idle_ms", 1e3 * idle_launch_s, "ms")  # the call with the GPU idle
        self.record(w, "host_total_ms", 1e3 * host / steps, "ms")
        self.record(w, "host_share_of_step", 100 * host / wall, "percent")
        self.record(w, "gpu_graph_share_of_step", 100 * graph_gpu_s * steps / wall, "percent")


def _graph_times(runner, batch: int) -> tuple[float, float]:
    """(GPU seconds of one replay of the decode graph for `batch` sequences, from events over 20 replays; host
    seconds of one replay call with the GPU idle); the buffers hold a real step of that batch."""
    graph, _ = runner.graphs[next(b for b in runner.graph_batch_sizes if b >= batch)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    calls = []
    for _ in range(5):
        t = time.perf_counter()
        graph.replay()
        calls.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20 / 1e3, statistics.median(calls)


def run_shape(shape: str, workloads: tuple[str, ...], commit: str, bandwidth: float, rate: float,
              scale: float = 1.0, out: Path | None = None, quantization: str | None = None) -> list[dict]:
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape_dir(shape, Path(tmp) / shape)
        t0 = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="bfloat16", device="cuda", load_format="dummy",
                                        quantization=quantization))
        bench = Bench(shape, engine, commit, torch.cuda.get_device_name(), quantization)
        bench.record("startup", "ready_s", time.perf_counter() - t0, "s")
        bench.record("startup", "max_num_seqs", engine.max_num_seqs, "sequences")
        bench.record("startup", "kv_blocks", engine.block_manager.num_blocks, "blocks")
        bench.record("startup", "cuda_graphs", len(engine.runner.graphs), "graphs")  # decode batches
        bench.record("startup", "prefill_cuda_graphs", len(engine.runner.prefill_graphs), "graphs")
        n = lambda count: max(16, int(count * scale))  # noqa: E731
        done = 0
        for w in ("startup", *workloads):
            t = time.perf_counter()
            if w == "latency":
                bench.latency(bandwidth)
            elif w == "fixed":
                bench.throughput("fixed 128->128", fixed(n(2000), 128, 128, seed=4))
            elif w == "sharegpt":
                bench.throughput("sharegpt-like", sharegpt_like(n(1000), seed=0))
            elif w == "prefix":
                bench.throughput("shared prefix 1k", shared_prefix(n(1000), seed=1))
            elif w == "long":
                bench.long_prefill(rate)
            elif w == "host":
                for batch in HOST_PROFILE_BATCHES:
                    bench.host_profile(batch)
            print(f"[{shape}] {w}: {time.perf_counter() - t:.1f} s", flush=True)
            _append(bench.records[done:], out)  # each workload's records as soon as it is done
            done = len(bench.records)
        engine = bench.engine = None  # drop the KV cache and weights before the next shape
        gc.collect()
        torch.cuda.empty_cache()
        return bench.records


def print_table(records: list[dict]) -> None:
    print(f"\n{'shape':<26}{'workload':<20}{'metric':<30}{'value':>14} unit")
    for r in records:
        print(f"{r['shape']:<26}{r['workload']:<20}{r['metric']:<30}{r['value']:>14,.2f} {r['unit']}")


def _append(records: list[dict], out: Path | None) -> None:
    print_table(records)
    if out is not None:
        with open(out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def run(shapes=("1.5b", "7b"), workloads=WORKLOADS, out: Path | None = None, scale: float = 1.0,
        quantization: str | None = None) -> list[dict]:
    """Each workload's records are printed and appended as soon as it is done (a cut-short run keeps them).
    `quantization` as engine.quantization ("fp8": the bf16 shapes quantized on load)."""
    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a CUDA GPU")
    commit = os.environ.get("DEEPFLEET_COMMIT", "unknown")
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    device, today = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    records = [dict(date=today, device=device, commit=commit, shape="-", workload="device", metric=metric,
                    value=round(value, 3), unit=unit)
               for metric, value, unit in (("copy_bandwidth", bandwidth / 1e12, "TB/s"),
                                           ("bf16_matmul", rate / 1e12, "TFLOP/s"))]
    _append(records, out)
    for shape in shapes:
        try:
            records += run_shape(shape, tuple(workloads), commit, bandwidth, rate, scale, out, quantization)
        except Exception:  # one failing shape should not hide the other's figures
            import traceback

            traceback.print_exc()
    return records
