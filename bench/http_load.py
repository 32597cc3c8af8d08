"""HTTP load on the OpenAI server next to the offline engine, same model, same workload (GPU):

    PYTHONPATH=runtime python3 bench/http_load.py --shape 1.5b 7b --concurrency 1 16 64 256

A server process (`serve-child`) builds the engine (random-weight DeepSeek-R1-Distill-Qwen shape, bf16, dummy
weights) and first measures it *offline*: a closed loop keeping C requests in flight through `LLMEngine`
directly. Then it serves that engine over HTTP (the real app: admission, async loop, SSE), and this process runs
the same closed loop with C concurrent streaming clients, spread over `--client-processes` processes so the
load generator is not what is measured. Both report requests/s, output tokens/s and TTFT
P50/P99, so the HTTP + scheduling overhead is the difference. Requests ask for no logprobs unless `--logprobs K`
(then both loops ask for them). Results go to bench/RESULTS.md.

`--json-schema`: the structured-output overhead instead (issue 17). No offline loop; per concurrency, after
warm-ups with the schema (which also compiles it once) and without, the same closed loop over HTTP without a
constraint, with `response_format` json_schema (strict) on every request, with it on every other request, and
without again; same server, same prompts' lengths, fresh prompts per row. Rows report TTFT and output tok/s
(schema outputs end when the JSON closes, so their token counts are summed as served).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server_wait import wait_ready

MODEL_NAME = "bench"
# long outputs under the grammar: an object holding an array of free strings (a random model closes it at will)
SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
          "required": ["notes"], "additionalProperties": False}


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)  # ids below the bench tokenizer's 544 so the server accepts them as token prompts
    return [[rng.randrange(10, 540) for _ in range(length)] for _ in range(n)]


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _summary(ttfts: list[float], tokens: int, elapsed: float, n: int) -> dict:
    return {"req_s": n / elapsed, "tok_s": tokens / elapsed, "ttft_p50_ms": 1e3 * _pct(ttfts, 50),
            "ttft_p99_ms": 1e3 * _pct(ttfts, 99)}


# ---- server child: offline figures, then serve ---------------------------------------------------------------------


def offline_closed_loop(engine, concurrency: int, n: int, prompt_len: int, output_len: int, seed: int,
                        logprobs: int | None = None) -> dict:
    from deepfleet.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=output_len, logprobs=logprobs)
    prompts = _prompts(n, prompt_len, seed)
    added: dict[str, float] = {}
    ttfts: list[float] = []
    tokens, nxt = 0, 0
    t0 = time.perf_counter()
    while nxt < n or engine.has_unfinished_requests():
        while nxt < n and len(added) < concurrency:
            rid = f"off-{seed}-{nxt}"
            engine.add_request(rid, prompts[nxt], params)
            added[rid] = time.perf_counter()
            nxt += 1
        for out in engine.step():
            start = added.get(out.request_id)
            if start is not None and out.outputs[0].token_ids and start > 0:
                ttfts.append(time.perf_counter() - start)
                added[out.request_id] = -1.0  # first token seen
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
                added.pop(out.request_id, None)
    return _summary(ttfts, tokens, time.perf_counter() - t0, n)


def bench_engine(args: argparse.Namespace, settings: Any) -> Any:
    """The server's engine factory (module-level: it runs in the engine process): builds the engine, measures it
    offline, and hands it to the server."""
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine

    # "tiny" is the CPU smoke test of this script; the GPU shapes use dummy (random, never read) weights
    gpu = {} if args.shape == "tiny" else {"dtype": "bfloat16", "device": "cuda", "load_format": "dummy"}
    if args.max_num_seqs:
        gpu["max_num_seqs"] = args.max_num_seqs  # fewer CUDA graphs to capture: a shorter start
    engine = LLMEngine(EngineConfig(model=settings.model, max_model_len=args.prompt_len + args.output_len + 16, **gpu))
    if args.json_schema:  # only the HTTP comparison: one warm-up loop per level, no offline figures
        for c in args.concurrency:
            offline_closed_loop(engine, c, c, args.prompt_len, args.output_len, seed=99 + c)
        Path(args.offline_out).write_text("{}")
        return engine
    for c in args.concurrency:  # warm-up at every level: kernels compiled, CUDA graphs of these batch sizes
        offline_closed_loop(engine, c, c, args.prompt_len, args.output_len, seed=99 + c)
    results = {c: offline_closed_loop(engine, c, _num_requests(c, args), args.prompt_len, args.output_len, c,
                                      args.logprobs) for c in args.concurrency}
    Path(args.offline_out).write_text(json.dumps(results))
    return engine


def serve_settings(args: argparse.Namespace, model_dir: str) -> Any:
    """The serve defaults (admission slots = the engine's max_num_seqs, queue, engine process, API processes for
    this host), as `deepfleet serve`."""
    from deepfleet.server.config import ServeSettings

    return ServeSettings(model=model_dir, served_model_name=MODEL_NAME, host="127.0.0.1", port=args.port,
                         warmup_requests=2, log_level="warning", engine_process=not args.engine_thread,
                         api_processes=args.api_processes)


def serve_child(args: argparse.Namespace) -> None:
    from deepfleet.server.lifecycle import run

    raise SystemExit(run(serve_settings(args, args.model_dir), functools.partial(bench_engine, args)))


# ---- load generator --------------------------------------------------------------------------------------------


async def _client_share(url: str, indices: list[int], concurrency: int, prompts: list[list[int]],
                        output_len: int, schema: dict | None = None, schema_every: int = 1,
                        logprobs: int | None = None) -> dict:
    """One load-generator process: `concurrency` streaming clients working through `indices`; with a schema,
    request i is constrained when i % schema_every == 0 (1: all of them)."""
    import httpx

    queue = list(indices)
    ttfts: list[float] = []
    schema_ttfts: list[float] = []  # of the constrained requests, when only some are
    tokens, errors = 0, []

    async def one_request(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {"model": MODEL_NAME, "prompt": prompts[i], "max_tokens": output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if logprobs is not None:
            body["logprobs"] = logprobs
        constrained = schema is not None and i % schema_every == 0
        if constrained:  # the grammar ends the output (EOS once the JSON closed): ignore_eos off
            body.update(ignore_eos=False, response_format={"type": "json_schema", "json_schema": {
                "name": "notes", "schema": schema, "strict": True}})
        t = time.monotonic()
        first = True
        async with client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if first and line.startswith("data: "):  # an event is sent per step with new tokens
                    (schema_ttfts if constrained and schema_every > 1 else ttfts).append(time.monotonic() - t)
                    first = False
                if line.startswith('data: {"id"') and '"choices":[]' in line:
                    tokens += json.loads(line[6:])["usage"]["completion_tokens"]

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            try:
                await one_request(client, queue.pop())
            except httpx.HTTPError as exc:  # counted and reported, not fatal: the other clients go on
                errors.append(repr(exc))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return {"ttfts": ttfts, "schema_ttfts": schema_ttfts, "tokens": tokens, "errors": errors, "start": start,
            "end": time.monotonic()}


def _run_share(args: tuple) -> dict:
    return asyncio.run(_client_share(*args))


def http_closed_loop(url: str, concurrency: int, n: int, prompt_len: int, output_len: int, seed: int,
                     processes: int, schema: dict | None = None, schema_every: int = 1,
                     logprobs: int | None = None) -> dict:
    """C streaming clients spread over several processes: one Python process parsing SSE tops out at a few
    thousand events/s, which would measure the load generator instead of the server."""
    from concurrent.futures import ProcessPoolExecutor

    prompts = _prompts(n, prompt_len, seed)  # other seeds than the offline run's: no prefix-cache head start
    workers = max(1, min(processes, concurrency))
    shares = [(url, list(range(w, n, workers)), concurrency // workers + (w < concurrency % workers), prompts,
               output_len, schema, schema_every, logprobs) for w in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_run_share, shares))
    errors = [e for part in parts for e in part["errors"]]
    elapsed = max(part["end"] for part in parts) - min(part["start"] for part in parts)
    result = _summary([t for part in parts for t in part["ttfts"]], sum(part["tokens"] for part in parts), elapsed,
                      n - len(errors))
    result["errors"] = len(errors)
    result["tokens_per_request"] = sum(part["tokens"] for part in parts) / max(1, n - len(errors))
    schema_ttfts = [t for part in parts for t in part["schema_ttfts"]]
    if schema_ttfts:  # the row's TTFT figures above are then the unconstrained requests' alone
        result["schema_ttft_p50_ms"], result["schema_ttft_p99_ms"] = (1e3 * _pct(schema_ttfts, q) for q in (50, 99))
    if errors:
        print(f"C={concurrency}: {len(errors)} failed requests, e.g. {errors[0]}")
    return result


def _num_requests(c: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, 4 * c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "serve-child"])
    ap.add_argument("--shape", nargs="+", default=["1.5b"], help="1.5b and/or 7b (GPU: one server after the "
                    "other), or tiny (CPU smoke test)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--client-processes", type=int, default=8, help="load-generator processes (clients spread "
                    "evenly); keep them on cores the server does not need")
    ap.add_argument("--engine-thread", action="store_true", help="run the server's engine in a thread of the server "
                    "process (engine_process: false), the baseline of the default engine process")
    ap.add_argument("--api-processes", type=int, help="server API processes (default: serve's for this host)")
    ap.add_argument("--results", help="append JSON records (bench/results.jsonl format) to this file")
    ap.add_argument("--json-schema", action="store_true", help="measure the structured-output overhead (above)")
    ap.add_argument("--logprobs", type=int, help="ask every request (HTTP and offline alike) for its sampled "
                    "tokens' logprobs with this many alternatives (default: none, as vLLM's serving benchmark)")
    ap.add_argument("--max-num-seqs", type=int, help="engine max_num_seqs (default: sized from memory)")
    ap.add_argument("--model-dir")
    ap.add_argument("--offline-out")
    args = ap.parse_args()
    shapes = args.shape
    if args.mode == "serve-child":
        args.shape = shapes[0]
        serve_child(args)
        return
    for shape in shapes:
        run_shape(argparse.Namespace(**{**vars(args), "shape": shape}))


def run_shape(args: argparse.Namespace) -> None:
    """One server of `args.shape`: its offline figures, then the HTTP rows (or the schema rows)."""
    import httpx

    from deepfleet.engine.benchmark import write_shape_dir
    from deepfleet.models.tiny import make_tiny_model
    from deepfleet.server import api_processes

    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "tiny":
            model_dir = make_tiny_model(Path(tmp) / "tiny", arch="qwen2")
        else:
            model_dir = write_shape_dir(args.shape, Path(tmp) / args.shape)
        offline_out = Path(tmp) / "offline.json"
        args.api_count = api_processes.count(serve_settings(args, str(model_dir)))
        print(f"server: {args.api_count} API process(es)", flush=True)
        child = subprocess.Popen(
            [sys.executable, __file__, "serve-child", "--model-dir", str(model_dir), "--offline-out",
             str(offline_out), "--shape", args.shape, "--port", str(args.port), "--prompt-len", str(args.prompt_len),
             "--output-len", str(args.output_len), "--min-requests", str(args.min_requests),
             *(["--engine-thread"] if args.engine_thread else []), *(["--json-schema"] if args.json_schema else []),
             *(["--max-num-seqs", str(args.max_num_seqs)] if args.max_num_seqs else []),
             *(["--logprobs", str(args.logprobs)] if args.logprobs is not None else []),
             *(["--api-processes", str(args.api_processes)] if args.api_processes else []),
             "--concurrency", *map(str, args.concurrency)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{args.port}"
        try:
            t0 = time.monotonic()
            if not wait_ready(args.port, child):
                raise SystemExit(f"server exited with {child.returncode}")
            print(f"server ready after {time.monotonic() - t0:.0f} s (engine init + offline runs + warm-up)")
            offline = {int(k): v for k, v in json.loads(offline_out.read_text()).items()}
            if args.json_schema:
                _schema_overhead(args, url)
                return
            _print_header(args)
            for c in args.concurrency:  # each row as soon as it is measured: a cut-short run keeps what it has
                online = http_closed_loop(url, c, _num_requests(c, args), args.prompt_len, args.output_len,
                                          10_000 + c, args.client_processes, logprobs=args.logprobs)
                _print_row(c, _num_requests(c, args), offline[c], online)
                if args.results:
                    _append_records(args, c, offline[c], online)
            metrics = httpx.get(url + "/metrics").text
            wanted = ("deepseek_gpu", "deepseek_inference_pre")
            print("\n".join(x for x in metrics.splitlines() if x.startswith(wanted)))
        finally:
            child.terminate()
            child.wait(60)


def _schema_overhead(args: argparse.Namespace, url: str) -> None:
    """Per concurrency: warm-ups with the schema (compiles it once) and without, then the rows (same call)."""
    print(f"\n== {args.shape}, prompt {args.prompt_len} -> up to {args.output_len} tokens: without / with a "
          "json_schema ==")
    print(f"{'C':>4} {'req':>5} {'run':>8} | {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} "
          f"{'tok/req':>7} {'errors':>6}")
    for c in args.concurrency:
        n = _num_requests(c, args)
        t0 = time.monotonic()
        http_closed_loop(url, c, c, args.prompt_len, args.output_len, 20_000 + c, args.client_processes, SCHEMA)
        print(f"warm-up with the schema (first compile included): {time.monotonic() - t0:.2f} s", flush=True)
        # the first measured unconstrained row ran at half the last one's rate twice (2026-12-02): warm that path
        # over HTTP too, and time it (a long warm-up points at the one-time cost)
        t0 = time.monotonic()
        http_closed_loop(url, c, 2 * c, args.prompt_len, args.output_len, 21_000 + c, args.client_processes)
        print(f"warm-up without a constraint ({2 * c} requests): {time.monotonic() - t0:.2f} s", flush=True)
        # The unconstrained loop runs before and after the constrained ones, each row on prompts of its own (a
        # repeated prompt would find its blocks in the prefix cache: a shorter prefill, a TTFT head start). "mixed":
        # every other request constrained, in the same batches as unconstrained ones; its TTFT columns are the
        # unconstrained requests' (the constrained ones' follow on the next line).
        rows = (("none", None, 1), ("schema", SCHEMA, 1), ("mixed", SCHEMA, 2), ("none", None, 1))
        for k, (label, schema, every) in enumerate(rows):
            r = http_closed_loop(url, c, n, args.prompt_len, args.output_len, 10_000 + 1_000 * k + c,
                                 args.client_processes, schema, every)
            print(f"{c:>4} {n:>5} {label:>8} | {r['req_s']:>7.2f} {r['tok_s']:>8.0f} {r['ttft_p50_ms']:>7.1f}ms "
                  f"{r['ttft_p99_ms']:>6.1f}ms {r['tokens_per_request']:>7.1f} {r['errors']:>6}", flush=True)
            if "schema_ttft_p50_ms" in r:
                print(f"{'':>11}constrained half: TTFT p50 {r['schema_ttft_p50_ms']:.1f}ms p99 "
                      f"{r['schema_ttft_p99_ms']:.1f}ms", flush=True)
            if args.results:
                _append_schema_records(args, c, label, r, f"row {k + 1} of {len(rows)}")


def _append_schema_records(args: argparse.Namespace, c: int, label: str, r: dict, row: str) -> None:
    import datetime

    import torch

    base = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                commit=os.environ.get("DEEPFLEET_COMMIT", "unknown"),
                shape=f"R1-Distill-Qwen-{args.shape.upper()} bf16",
                workload=f"http closed loop C={c}, {args.prompt_len}->{args.output_len}, " + {
                    "none": "no constraint", "schema": "json_schema strict",
                    "mixed": "every other request json_schema strict (TTFT: the unconstrained ones)"}[label]
                + f", {row}")
    figures = [("http_tok_s", r["tok_s"], "tok/s"), ("http_ttft_p50_ms", r["ttft_p50_ms"], "ms"),
               ("http_ttft_p99_ms", r["ttft_p99_ms"], "ms"), ("tokens_per_request", r["tokens_per_request"], "tokens"),
               ("http_errors", r["errors"], "count")]
    if "schema_ttft_p50_ms" in r:
        figures += [("constrained_ttft_p50_ms", r["schema_ttft_p50_ms"], "ms"),
                    ("constrained_ttft_p99_ms", r["schema_ttft_p99_ms"], "ms")]
    with open(args.results, "a") as f:
        for metric, value, unit in figures:
            f.write(json.dumps({**base, "metric": metric, "value": round(value, 3), "unit": unit}) + "\n")


def _append_records(args: argparse.Namespace, c: int, offline: dict, online: dict) -> None:
    import datetime

    import torch

    base = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                commit=os.environ.get("DEEPFLEET_COMMIT", "unknown"),
                shape=f"R1-Distill-Qwen-{args.shape.upper()} bf16",
                workload=f"http closed loop C={c}, {args.prompt_len}->{args.output_len}, serve defaults "
                         f"(api_processes {args.api_count})"
                         + ("" if args.logprobs is None else f", logprobs {args.logprobs}"))
    with open(args.results, "a") as f:
        for metric, value, unit in (("offline_tok_s", offline["tok_s"], "tok/s"),
                                    ("http_tok_s", online["tok_s"], "tok/s"),
                                    ("http_of_offline", 100 * online["tok_s"] / offline["tok_s"], "percent"),
                                    ("http_ttft_p50_ms", online["ttft_p50_ms"], "ms"),
                                    ("http_errors", online["errors"], "count")):
            f.write(json.dumps({**base, "metric": metric, "value": round(value, 3), "unit": unit}) + "\n")


def _print_header(args: argparse.Namespace) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    where = "a thread of the server" if args.engine_thread else "its own process"
    asked = "no logprobs" if args.logprobs is None else f"logprobs {args.logprobs}"
    print(f"\n== {args.shape}, prompt {args.prompt_len} -> {args.output_len} tokens, {asked}, {device}, engine in "
          f"{where} ==")
    print(f"{'C':>4} {'req':>5} | {'offline req/s':>13} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} | "
          f"{'HTTP req/s':>10} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'errors':>6} | {'HTTP/offline tok/s':>18}")


def _print_row(c: int, n: int, o: dict, h: dict) -> None:
    def fig(r: dict) -> str:
        return f"{r['req_s']:>10.2f} {r['tok_s']:>8.0f} {r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>6.1f}ms"

    print(f"{c:>4} {n:>5} | {'':>3}{fig(o)} | {fig(h)} {h['errors']:>6} | {h['tok_s'] / o['tok_s']:>17.0%}", flush=True)


if __name__ == "__main__":
    main()
