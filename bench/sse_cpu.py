"""The OpenAI server's own cost per SSE event, on CPU, with an engine that costs nothing (issue 12's HTTP gap):

    PYTHONPATH=runtime python3 bench/sse_cpu.py --concurrency 256 --step-ms 4

A server process (`serve-child`: the real app, `deepfleet serve` defaults, the engine in its own process) serves a
*paced* fake engine: every `--step-ms` it gives each running request one token (3 characters, with a logprob entry
when asked), as a GPU engine at that step time would, so the offline rate is known: C / step tokens/s. This
process runs a closed loop of C streaming `/v1/completions` clients (the body `bench/http_load.py` sends: token
prompt, usage chunk; `logprobs` only with `--logprobs K`) over raw loopback sockets (an HTTP client library would
cost more CPU than the server on a 2-core machine), and reports output tok/s as a share of the pace, the SSE events
received, and the API process's CPU time (from /proc) per event and per token: the figure that does not depend on
what else the machine runs. `--api-processes N`: N API processes in front of the engine (`api_processes`; their CPU
time summed; default 1, serve's default on a host without a GPU). Load stays bounded: C connections on 127.0.0.1,
`--requests` in all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from server_wait import wait_ready

MODEL_NAME = "bench"
PIECE = "ab "  # each token's text


class PacedTokenizer:
    """Enough of a tokenizer for the server: token prompts, one piece of text per token."""

    vocab_size = 1024
    eos_token_ids = {0}
    chat_templates: dict = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [10 + ord(c) % 500 for c in text] or [10]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return PIECE * len(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return "".join(m["content"] for m in messages)


@dataclass
class _Running:
    prompt: list[int]
    params: object
    output: object  # the request's CompletionOutput, extended in place as the engine's is


class PacedEngine:
    """The LLMEngine contract at a fixed step time and no compute: each step, one token for every request."""

    max_model_len = 4096

    def __init__(self, step_s: float, max_num_seqs: int) -> None:
        self.tokenizer = PacedTokenizer()
        self.max_num_seqs = max_num_seqs
        self._step_s = step_s
        self._next = 0.0
        self._running: dict[str, _Running] = {}

    def add_request(self, request_id, prompt, params, priority=0, deadline=None) -> None:
        from deepfleet.engine.outputs import CompletionOutput, TextSoFar

        logprobs = [] if params.logprobs is not None else None
        self._running[request_id] = _Running(list(prompt), params, CompletionOutput(0, TextSoFar(), [], None, logprobs))

    def abort_request(self, request_id) -> None:
        self._running.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._running)

    def step(self) -> list:
        from deepfleet.engine.outputs import RequestOutput

        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(now, self._next) + self._step_s
        outputs = []
        for rid, r in list(self._running.items()):
            c = r.output
            c.token_ids.append(100 + len(c.token_ids) % 300)
            c._text.append(PIECE)
            c.text = c._text
            if c.logprobs is not None:
                c.logprobs.append({"token_id": c.token_ids[-1], "logprob": -0.5, "top_logprobs": {}})
            done = len(c.token_ids) >= r.params.max_tokens
            if done:
                c.finish_reason = "length"
                del self._running[rid]
            outputs.append(RequestOutput(rid, None, r.prompt, [c], done))
        return outputs

    def stats(self):
        from deepfleet.engine.outputs import EngineStats

        return EngineStats(len(self._running), 0, 0.0, 0, 0, 0, 0, 0)


def paced_engine(args: argparse.Namespace, settings) -> PacedEngine:
    """The server's engine factory (module level: it runs in the engine process)."""
    # twice the streams: admission is never the limit, also where it is split between API processes whose
    # connection counts differ (the kernel spreads connections by hash)
    return PacedEngine(args.step_ms / 1e3, 2 * max(args.concurrency))


def serve_child(args: argparse.Namespace) -> None:
    import functools

    from deepfleet.server.config import ServeSettings
    from deepfleet.server.lifecycle import run

    settings = ServeSettings(model="paced", served_model_name=MODEL_NAME, host="127.0.0.1", port=args.port,
                             warmup_requests=1, log_level="warning", generation_config="vllm",
                             api_processes=args.api_processes)
    raise SystemExit(run(settings, functools.partial(paced_engine, args)))


# ---- load generator: raw HTTP/1.1 over loopback -----------------------------------------------------------------


async def _stream_once(reader, writer, body: bytes) -> tuple[int, int]:
    """One streaming request on a kept-alive connection: (SSE events, completion tokens from the usage chunk)."""
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode() + (await reader.read(2000)).decode(errors="replace"))
    events = tokens = 0
    while True:  # chunked transfer encoding
        size = int((await reader.readline()).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return events, tokens
        events += data.count(b"data: ")
        at = data.find(b'"completion_tokens":')
        if at >= 0:
            tokens += int(data[at + 20 : data.index(b",", at)])


async def _client_share(port: int, clients: int, requests: int, prompt_len: int, output_len: int,
                        seed: int, logprobs: int | None) -> dict:
    rng = random.Random(seed)
    todo = [requests // clients + (k < requests % clients) for k in range(clients)]
    totals = {"events": 0, "tokens": 0, "requests": 0}

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(n):
            body = {"model": MODEL_NAME, "prompt": [rng.randrange(10, 540) for _ in range(prompt_len)],
                    "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if logprobs is not None:
                body["logprobs"] = logprobs
            body = json.dumps(body).encode()
            events, tokens = await _stream_once(reader, writer, body)
            totals["events"] += events
            totals["tokens"] += tokens
            totals["requests"] += 1
        writer.close()

    await asyncio.gather(*(client(n) for n in todo))
    return totals


def _run_share(args: tuple) -> dict:
    return asyncio.run(_client_share(*args))


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _server_pids(server_pid: int) -> tuple[list[int], int]:
    """(the API processes: the server itself, or its deepfleet-api children with api_processes > 1; the engine)."""
    children = [int(c) for task in Path(f"/proc/{server_pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    names = {c: Path(f"/proc/{c}/comm").read_text().strip() for c in children}
    apis = [c for c, name in names.items() if name.startswith("deepfleet-api")] or [server_pid]
    return apis, next(c for c, name in names.items() if name == "deepfleet-eng")


def closed_loop(port: int, server_pid: int, concurrency: int, requests: int, prompt_len: int, output_len: int,
                processes: int, seed: int, logprobs: int | None = None) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(processes, concurrency))
    shares = [(port, concurrency // workers + (w < concurrency % workers),
               requests // workers + (w < requests % workers), prompt_len, output_len, seed + w, logprobs)
              for w in range(workers)]
    api_pids, engine_pid = _server_pids(server_pid)

    def api_cpu_s() -> float:
        return sum(map(_cpu_s, api_pids))

    with ProcessPoolExecutor(workers) as pool:
        api0, engine0, t0 = api_cpu_s(), _cpu_s(engine_pid), time.monotonic()
        parts = list(pool.map(_run_share, shares))
        elapsed, api_s, engine_s = time.monotonic() - t0, api_cpu_s() - api0, _cpu_s(engine_pid) - engine0
    events = sum(p["events"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    return {"tok_s": tokens / elapsed, "events": events, "tokens": tokens, "elapsed_s": elapsed,
            "api_cpu_s": api_s, "engine_cpu_s": engine_s, "api_us_per_event": 1e6 * api_s / events,
            "api_us_per_token": 1e6 * api_s / tokens, "tokens_per_event": tokens / events,
            "requests": sum(p["requests"] for p in parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "serve-child"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[256])
    ap.add_argument("--requests", type=int, default=1024, help="per concurrency level")
    ap.add_argument("--step-ms", type=float, default=4.0, help="the fake engine's step time (pace: C / step tok/s)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--client-processes", type=int, default=1)
    ap.add_argument("--port", type=int, default=0, help="default: a free one")
    ap.add_argument("--api-processes", type=int, default=1, help="server API processes (serve's default on a "
                    "host without a GPU is 1)")
    ap.add_argument("--logprobs", type=int, help="ask every request for its tokens' logprobs with this many "
                    "alternatives (default: none, as bench/http_load.py)")
    ap.add_argument("--label", default="", help="a name for this run's rows (e.g. the commit under test)")
    ap.add_argument("--results", help="append JSON records (bench/results.jsonl format) to this file")
    args = ap.parse_args()
    if args.mode == "serve-child":
        serve_child(args)
        return
    if not args.port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, __file__, "serve-child", "--port", str(args.port), "--step-ms",
                              str(args.step_ms), "--api-processes", str(args.api_processes),
                              "--concurrency", *map(str, args.concurrency)],
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        if not wait_ready(args.port, child, interval=0.2):
            raise SystemExit(f"server exited with {child.returncode}")
        for c in args.concurrency:
            closed_loop(args.port, child.pid, c, c, args.prompt_len, args.output_len, args.client_processes, 7,
                        args.logprobs)
            r = closed_loop(args.port, child.pid, c, args.requests, args.prompt_len, args.output_len,
                            args.client_processes, 1000 + c, args.logprobs)
            pace = c / (args.step_ms / 1e3)
            print(f"{args.label} C={c} step {args.step_ms:g} ms: {r['tok_s']:,.0f} tok/s = "
                  f"{100 * r['tok_s'] / pace:.1f}% of the pace {pace:,.0f}; {r['events']} events "
                  f"({r['tokens_per_event']:.2f} tokens each); {args.api_processes} API process(es) "
                  f"{r['api_cpu_s']:.2f} CPU s = "
                  f"{r['api_us_per_event']:.1f} us/event, {r['api_us_per_token']:.1f} us/token; engine process "
                  f"{r['engine_cpu_s']:.2f} CPU s; {r['elapsed_s']:.1f} s", flush=True)
            if args.results:
                _append_records(args, c, r, pace)
    finally:
        child.terminate()
        child.wait(60)


def _append_records(args: argparse.Namespace, c: int, r: dict, pace: float) -> None:
    import datetime

    base = dict(date=datetime.date.today().isoformat(), device="CPU (2-core build machine, loopback)",
                commit=args.label or os.environ.get("DEEPFLEET_COMMIT", "unknown"), shape="paced fake engine",
                workload=f"sse_cpu closed loop C={c}, {args.prompt_len}->{args.output_len}, step {args.step_ms:g} ms, "
                         f"completions stream logprobs={args.logprobs} + usage, serve defaults, "
                         f"api_processes {args.api_processes}")
    with open(args.results, "a") as f:
        for metric, value, unit in (("http_tok_s", r["tok_s"], "tok/s"),
                                    ("http_of_pace", 100 * r["tok_s"] / pace, "percent"),
                                    ("api_us_per_event", r["api_us_per_event"], "us"),
                                    ("api_us_per_token", r["api_us_per_token"], "us"),
                                    ("tokens_per_event", r["tokens_per_event"], "tokens")):
            f.write(json.dumps({**base, "metric": metric, "value": round(value, 3), "unit": unit}) + "\n")


if __name__ == "__main__":
    main()
