"""Several API processes in front of one engine process (`api_processes`): the default per host, the refused
combinations, the engine's routing of events by owner, and `deepfleet serve --api-processes 2` as real processes
on loopback: streams served by both processes, metrics and admission counts summed over them, SIGTERM drains
both, and one killed process ends the server (status 1) after the other finished its streams."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import MODEL_NAME, free_port

from deepfleet.server import api_processes
from deepfleet.server.api_processes import Peer
from deepfleet.server.config import ServeSettings, SettingsError, load_settings
from deepfleet.server.engine_loop import Accepted, Died, Refused, Stepped
from deepfleet.server.engine_process import _Channels, owner_of

STREAMS, MAX_TOKENS, GRACE_S = 12, 200, 60


def _settings(**fields) -> ServeSettings:
    return ServeSettings.model_validate({"model": "m", **fields})


def test_default_is_one_per_four_cpus_up_to_four_on_gpu_hosts_and_one_elsewhere():
    assert api_processes.count(_settings(), cpus=16, gpu=True) == 4
    assert api_processes.count(_settings(), cpus=128, gpu=True) == 4
    assert api_processes.count(_settings(), cpus=8, gpu=True) == 2
    assert api_processes.count(_settings(), cpus=2, gpu=True) == 1
    assert api_processes.count(_settings(), cpus=16, gpu=False) == 1
    assert api_processes.count(_settings(engine={"device": "cpu"}), cpus=16, gpu=True) == 1
    # where several would be refused, the default is one
    assert api_processes.count(_settings(engine_process=False), cpus=16, gpu=True) == 1
    assert api_processes.count(_settings(engine={"enable_lora": True}), cpus=16, gpu=True) == 1
    assert api_processes.count(_settings(audit={"max_bytes": 8192}), cpus=16, gpu=True) == 1
    assert api_processes.count(_settings(api_processes=3), cpus=2, gpu=False) == 3


@pytest.mark.parametrize("fields, why", [
    ({"engine_process": False}, "engine_process: false"),
    ({"engine": {"lora_modules": {"a": "/x"}}}, "LoRA is on"),
    ({"audit": {"max_bytes": 8192}}, "audit.max_bytes"),
    ({"max_concurrent": 1}, "max_concurrent 1"),
])
def test_several_api_processes_are_refused_where_per_process_state_would_be_wrong(fields, why):
    with pytest.raises(SettingsError) as err:
        load_settings(overrides={"model": "m", "api_processes": 2, **fields}, env={})
    assert "api_processes 2: not supported while" in str(err.value) and why in str(err.value)
    load_settings(overrides={"model": "m", "api_processes": 1, **fields}, env={})  # one is fine


def test_auth_with_several_api_processes_is_refused(tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    with pytest.raises(SettingsError, match="auth is on: rate limits are counted per process"):
        load_settings(overrides={"model": "m", "api_processes": 2, "auth": {"jwks_file": str(jwks)}}, env={})


def test_the_parts_of_slots_and_queue_add_up():
    for n in (2, 3, 4):
        for total in (0, 1, 5, 64, 1023):
            parts = [Peer(k, n, None, None, None).share(total) for k in range(n)]
            assert sum(parts) == total and max(parts) - min(parts) <= 1


class _Pipe:
    def __init__(self, broken: bool = False) -> None:
        self.sent: list = []
        self.broken = broken
        self.closed = False

    def send(self, event) -> None:
        if self.broken:
            raise BrokenPipeError
        self.sent.append(event)

    def close(self) -> None:
        self.closed = True


def _delta(request_id: str, finished: bool = False) -> tuple:
    return (request_id, "x", [1], None, None, None, finished, 0, None)


def test_the_engine_routes_each_output_to_the_process_that_sent_the_request():
    pipes = {"0": _Pipe(), "1": _Pipe()}
    channels = _Channels(dict(pipes))
    channels.send(Stepped([_delta("0:req-0-0"), _delta("1:req-0-0"), _delta("1:req-1-0", True)], "stats"))
    assert [[d[0] for d in e.outputs] for e in pipes["0"].sent] == [["0:req-0-0"]]
    assert [[d[0] for d in e.outputs] for e in pipes["1"].sent] == [["1:req-0-0", "1:req-1-0"]]
    assert all(e.stats == "stats" for p in pipes.values() for e in p.sent)  # every process gets the stats
    channels.send(Accepted("1:req-2"))
    channels.send(Refused("0:adapter-3", "no"))
    assert isinstance(pipes["1"].sent[-1], Accepted) and isinstance(pipes["0"].sent[-1], Refused)
    channels.send(Died("gone"))
    assert all(isinstance(p.sent[-1], Died) for p in pipes.values())
    assert owner_of("req-5") == "" and owner_of("3:req-5-1") == "3"


def test_outputs_of_a_gone_process_become_aborts_and_the_last_one_gone_ends_the_engine():
    pipes = {"0": _Pipe(), "1": _Pipe(broken=True)}
    channels = _Channels(dict(pipes))
    channels.send(Stepped([_delta("1:req-0-0")], None))  # the send finds process 1 gone
    assert pipes["1"].closed
    channels.send(Stepped([_delta("0:req-1-0"), _delta("1:req-0-0"), _delta("1:req-2-0", True)], None))
    assert channels.orphans == ["1:req-0-0"]  # still running for nobody: aborted next; the finished one is not
    assert [d[0] for d in pipes["0"].sent[-1].outputs] == ["0:req-1-0"]
    channels.drop("0")  # detached
    with pytest.raises(BrokenPipeError):
        channels.send(Stepped([], None))


def test_one_api_process_gets_everything_without_prefixes():
    pipe = _Pipe()
    channels = _Channels({"": pipe})
    channels.send(Stepped([_delta("req-0-0")], None))
    channels.send(Accepted("req-0"))
    assert len(pipe.sent) == 2 and pipe.sent[0].outputs[0][0] == "req-0-0"


# ---- `deepfleet serve --api-processes 2`, real processes ---------------------------------------------------------


@pytest.fixture
def serve_two(tiny_model):
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepfleet"), "serve", str(tiny_model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", MODEL_NAME, "--api-processes", "2", "--max-concurrent", "64",
           "--set", "warmup_requests=1", "--set", f"shutdown_grace_s={GRACE_S}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"server did not become ready:\n{proc.communicate()[0]}")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _api_pids(supervisor: int) -> dict[int, str]:
    """pid -> name of the supervisor's API processes (deepfleet-api0, deepfleet-api1)."""
    children = [int(c) for task in Path(f"/proc/{supervisor}/task").iterdir()
                for c in (task / "children").read_text().split()]
    names = {c: Path(f"/proc/{c}/comm").read_text().strip() for c in children}
    return {pid: name for pid, name in names.items() if name.startswith("deepfleet-api")}


def _scrape(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def _stream(url: str, i: int, started: list[int]) -> dict:
    """One stream on a connection of its own (so the kernel may hand it to either API process)."""
    body = {"model": MODEL_NAME, "prompt": f"Stream {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "seed": i, "stream": True}
    pieces, finish, done = 0, None, False
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        pieces += 1
                        finish = json.loads(line[6:])["choices"][0].get("finish_reason") or finish
                        if pieces == 1:
                            started[0] += 1
    except httpx.TransportError as exc:
        return {"done": False, "error": type(exc).__name__, "pieces": pieces}
    return {"done": done, "finish": finish, "pieces": pieces}


async def _until(predicate, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def test_two_api_processes_sum_their_metrics_and_drain_together_on_sigterm(serve_two):
    proc, url = serve_two
    assert sorted(_api_pids(proc.pid).values()) == ["deepfleet-api0", "deepfleet-api1"]
    for i in range(8):  # fresh connections: spread over both processes
        r = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": f"p{i}", "max_tokens": 2})
        assert r.status_code == 200, r.text
    for _ in range(6):  # whichever process answers the scrape, it reports every process's requests
        text = httpx.get(url + "/metrics").text
        assert _scrape(text, 'deepseek_inference_requests_total{endpoint="/v1/completions",status="200"}') == 8
        assert _scrape(text, "vllm:e2e_request_latency_seconds_count") == 8

    async def scenario() -> tuple[list[dict], float]:
        started = [0]
        streams = [asyncio.create_task(_stream(url, i, started)) for i in range(STREAMS)]
        await _until(lambda: started[0] == STREAMS)
        async with httpx.AsyncClient(base_url=url) as client:
            text = (await client.get("/metrics")).text
        assert _scrape(text, "deepseek_inference_admitted_requests ") == STREAMS  # both processes' slots
        os.kill(proc.pid, signal.SIGTERM)
        t_term = time.monotonic()
        return await asyncio.gather(*streams), t_term

    results, t_term = asyncio.run(scenario())
    assert all(r["done"] and r["finish"] == "length" for r in results), results
    assert proc.wait(timeout=GRACE_S + 10) == 0, proc.stdout.read()
    assert time.monotonic() - t_term < GRACE_S


def test_a_killed_api_process_ends_the_server_after_the_other_finished_its_streams(serve_two):
    proc, url = serve_two
    pids = {name: pid for pid, name in _api_pids(proc.pid).items()}

    async def scenario() -> list[dict]:
        started = [0]
        streams = [asyncio.create_task(_stream(url, i, started)) for i in range(STREAMS)]
        await _until(lambda: started[0] == STREAMS)
        os.kill(pids["deepfleet-api1"], signal.SIGKILL)
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=url) as client:  # unready (or closed) at once, not serving on
            try:
                assert (await client.get("/readyz")).status_code == 503
            except httpx.TransportError:
                pass
        return await asyncio.gather(*streams)

    results = asyncio.run(scenario())
    cut = [r for r in results if not r["done"]]
    served = [r for r in results if r["done"]]
    # the killed process's streams broke off; the other's ran to their end: so both served some
    assert cut and served, results
    assert all(r["finish"] == "length" for r in served)
    assert proc.wait(timeout=GRACE_S + 10) == 1
    log = proc.stdout.read()
    assert "deepfleet-api1 (pid" in log and "exited with status -9: stopping the server" in log, log
    assert "API process '1' is gone: its requests are aborted" in log, log
