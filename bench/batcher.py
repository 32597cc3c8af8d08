"""Dynamic batcher vs one-request-at-a-time over KServe v2 HTTP, on the same ONNX model in the same run.

For each model size, starts `deepfleet serve-models` (a separate process, so client and server do not
share a GIL) on a repository whose only difference is the batching config, and drives it from N
concurrent asyncio clients on loopback (a minimal keep-alive HTTP/1.1 client: httpx would spend more CPU
than the server on a 2-core box). Configurations:

    one-at-a-time   max_batch_size 1, max_queue_delay 0
    batched         max_batch_size / max_queue_delay from deepfleet.defaults (32, 5 ms)
    batched+adaptive  the same with the load-based controller (×1.5 below 30 % load, ×0.7 above 80 %)

Each is measured at `--clients` (default 100) and at 1 client (where the batcher can only add its delay).
Prints a Markdown table for bench/RESULTS.md and writes the raw figures as JSON.

    python bench/batcher.py                       # both model sizes, 100 clients
    python bench/batcher.py --models small --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deepfleet.batching.examples import classifier_config, export_classifier
from deepfleet.batching.repository import write_config
from deepfleet.defaults import BATCHER_MAX_BATCH_SIZE, BATCHER_MAX_QUEUE_DELAY_MS

# (features, hidden, classes, layers): "small" is dominated by HTTP/JSON cost, "wide" by model compute
MODELS = {"small": (16, 64, 4, 2), "wide": (256, 2048, 100, 4)}
CONFIGS = {
    "one-at-a-time": {"max_batch_size": 1, "max_queue_delay_ms": 0},
    "batched": {},
    "batched+adaptive": {"adaptive": {"enabled": True}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One keep-alive HTTP/1.1 connection posting a fixed JSON body."""

    def __init__(self, port: int, path: str, body: bytes):
        self.port = port
        self.request = (
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc):
        self.writer.close()

    async def post(self) -> int:
        self.writer.write(self.request)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.reader.readexactly(length)
        return int(status_line.split()[1])


async def drive(port: int, path: str, body: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def one_client():
        nonlocal errors
        async with Client(port, path, body) as client:
            while time.perf_counter() < stop_at and len(latencies) + errors < max_requests:
                t0 = time.perf_counter()
                status = await client.post()
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed, "throughput": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def server_counters(port: int) -> dict:
    """Cumulative batch-size and queue-delay sums/counts from the server's /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    names = ("batch_size_sum", "batch_size_count", "queue_delay_seconds_sum", "queue_delay_seconds_count")
    found = {}
    for name in names:
        m = re.search(rf'^deepfleet_batcher_{name}{{model="classifier"}} (\S+)$', text, re.M)
        found[name] = float(m.group(1)) if m else 0.0
    return found


def window_means(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in after}
    return {"mean_batch": d["batch_size_sum"] / max(d["batch_size_count"], 1),
            "mean_queue_ms": 1000 * d["queue_delay_seconds_sum"] / max(d["queue_delay_seconds_count"], 1)}


class Served:
    def __init__(self, repo: Path, cpus: set[int] | None):
        self.repo, self.port, self.cpus = repo, free_port(), cpus

    def __enter__(self):
        cli = [sys.executable, "-c", "from deepfleet.cli import main; main()"]  # works without the console script
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        self.proc = subprocess.Popen([*cli, "serve-models", str(self.repo), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=pin)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start: " + self.proc.stderr.read().decode()[-2000:]) from None
                time.sleep(0.1)

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(args) -> list[dict]:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-batcher-"))
    try:
        for size in args.models:
            features, hidden, classes, layers = MODELS[size]
            model_file = work / f"{size}.onnx"
            export_classifier(model_file, features, hidden, classes, layers)
            x = np.random.default_rng(0).standard_normal((1, features)).astype(np.float32)
            body = json.dumps({"inputs": [{"name": "x", "shape": [1, features], "datatype": "FP32",
                                           "data": x.ravel().tolist()}]}).encode()
            for name, settings in CONFIGS.items():
                repo = work / size / name
                config = classifier_config(features=features, classes=classes, intra_op_threads=args.threads,
                                           **settings)
                write_config(repo / "classifier", config)
                shutil.copy(model_file, repo / "classifier" / "model.onnx")
                with Served(repo, args.server_cpus) as srv:
                    path = "/v2/models/classifier/infer"
                    asyncio.run(drive(srv.port, path, body, args.clients, args.warmup, 10**9))
                    for clients in (args.clients, 1):
                        before = server_counters(srv.port)
                        result = asyncio.run(drive(srv.port, path, body, clients, args.seconds, args.requests))
                        result.update(model=size, config=name, clients=clients,
                                      **window_means(before, server_counters(srv.port)))
                        rows.append(result)
                        print(json.dumps(result), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def table(rows: list[dict], clients: int) -> str:
    out = ["| model | config | clients | req/s | P50 ms | P99 ms | mean batch | mean queue ms | errors |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['config']} | {r['clients']} | {r['throughput']:.0f} | {r['p50_ms']:.2f} | "
                   f"{r['p99_ms']:.2f} | {r['mean_batch']:.1f} | {r['mean_queue_ms']:.2f} | {r['errors']} |")
    out.append("")
    for size in dict.fromkeys(r["model"] for r in rows):
        get = {(r["config"], r["clients"]): r for r in rows if r["model"] == size}
        base, bat = get[("one-at-a-time", clients)], get[("batched", clients)]
        base1, bat1 = get[("one-at-a-time", 1)], get[("batched", 1)]
        ada = get[("batched+adaptive", clients)]
        out.append(
            f"- **{size}**: throughput ×{bat['throughput'] / base['throughput']:.2f} at {clients} clients "
            f"(adaptive: ×{ada['throughput'] / base['throughput']:.2f}); added P99 at 1 client "
            f"{bat1['p99_ms'] - base1['p99_ms']:+.2f} ms; P99 batched − one-at-a-time at {clients} clients "
            f"{bat['p99_ms'] - base['p99_ms']:+.2f} ms."
        )
    return "\n".join(out)


def _cpus(text: str) -> set[int]:
    return {int(c) for c in text.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small", "wide"])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per configuration")
    parser.add_argument("--requests", type=int, default=20000, help="request cap per configuration")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (same for all)")
    parser.add_argument("--out", type=Path, default=Path("bench/.out/batcher.json"))
    parser.add_argument("--server-cpus", type=_cpus, help="pin the server to these cores, e.g. 0,1")
    parser.add_argument("--client-cpus", type=_cpus, help="pin the load generator to these cores, e.g. 2,3 "
                        "(clients are other machines in production: keep them off the server's cores)")
    args = parser.parse_args()
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "server_cpus": sorted(args.server_cpus or []),
            "client_cpus": sorted(args.client_cpus or []), "defaults": {
        "max_batch_size": BATCHER_MAX_BATCH_SIZE, "max_queue_delay_ms": BATCHER_MAX_QUEUE_DELAY_MS}}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows, args.clients))


if __name__ == "__main__":
    main()
