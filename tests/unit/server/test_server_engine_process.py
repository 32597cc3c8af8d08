"""The engine in a process of its own (`engine_process: true`, the default): same outputs as the engine in a thread,
outputs crossing as deltas rebuild the engine's cumulative ones, a load failure or a killed engine process is
reported (never a hang), and the engine process does not outlive the server."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import MODEL_NAME, free_port, live_server, settings_for

from deepfleet.engine.outputs import CompletionOutput, RequestOutput
from deepfleet.server.engine_process import _DeltaDecoder, _DeltaEncoder, _frames, event_pipe


def _output(rid: str, text: str, tokens: list[int], finish: str | None, logprobs: bool = True) -> RequestOutput:
    lps = [{"token_id": t, "logprob": -0.1 * t, "top_logprobs": {t: -0.1 * t}} for t in tokens] if logprobs else None
    return RequestOutput(rid, "prompt", [1, 2, 3], [CompletionOutput(0, text, list(tokens), finish, lps)],
                         finish is not None, num_cached_tokens=16)


def test_deltas_rebuild_the_cumulative_outputs():
    encoder, decoder = _DeltaEncoder(), _DeltaDecoder()
    steps = [
        [_output("a", "He", [5], None), _output("b", "x", [9], None, logprobs=False)],
        [_output("a", "Hello", [5, 6], None)],
        [_output("a", "Hello, wo", [5, 6, 7], None), _output("b", "xy", [9, 10], "stop", logprobs=False)],
        [_output("a", "Hello, world", [5, 6, 7, 8], "length")],
    ]
    for step in steps:
        for want, got in zip(step, decoder.decode(encoder.encode(step)), strict=True):
            assert (got.request_id, got.finished, got.num_cached_tokens) == (want.request_id, want.finished, 16)
            w, g = want.outputs[0], got.outputs[0]
            assert (g.text, g.token_ids, g.logprobs, g.finish_reason) == (w.text, w.token_ids, w.logprobs,
                                                                          w.finish_reason)
    assert encoder._sent == {} and decoder._outputs == {}  # finished requests leave nothing behind


def test_an_aborted_request_leaves_nothing_behind():
    encoder, decoder = _DeltaEncoder(), _DeltaDecoder()
    decoder.decode(encoder.encode([_output("a", "Hi", [5], None)]))
    encoder.forget(["a"])
    assert decoder.decode(encoder.encode([]))[0].finished
    assert encoder._sent == {} and decoder._outputs == {}


def _completion(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "The fleet", "max_tokens": 12,
                                                  "logprobs": 2, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_process_and_thread_engines_answer_alike(tiny_model, server):
    assert server.settings.engine_process  # the shared server runs the default
    with live_server(settings_for(tiny_model, engine_process=False)) as threaded:
        for body in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
            ours, theirs = _completion(server.url, **body), _completion(threaded.url, **body)
            assert ours["text"] == theirs["text"], body
            a, b = ours["logprobs"], theirs["logprobs"]
            assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"], body
            # the shared server may hold the prompt's KV from an earlier test (prefix cache, other batch shapes):
            # float32 sums in another order, so logprobs agree to rounding, not to the bit
            assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4), body
            for x, y in zip(a["top_logprobs"], b["top_logprobs"], strict=True):
                assert x.keys() == y.keys() and list(x.values()) == pytest.approx(list(y.values()), abs=1e-4), body


def test_load_failure_in_the_engine_process_names_the_reason(tmp_path):
    # an empty model directory: the engine process fails to load it
    with live_server(settings_for(tmp_path)) as server:
        r = httpx.get(server.url + "/healthz")
        assert r.status_code == 503 and "config.json" in r.json()["error"]


def test_killed_engine_process_fails_open_requests_and_health(tiny_model):
    with live_server(settings_for(tiny_model, engine={"max_model_len": 400})) as server:
        body = {"model": MODEL_NAME, "prompt": "go", "max_tokens": 380, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generating
            os.kill(server.state.engine.driver.pid, signal.SIGKILL)
            rest = list(lines)
        assert any('"code":"engine_unavailable"' in line for line in rest), rest[-3:]
        assert "data: [DONE]" not in rest
        health = httpx.get(server.url + "/healthz")
        assert health.status_code == 503 and "exited" in health.json()["error"]
        assert httpx.post(server.url + "/v1/completions", json={**body, "stream": False}).status_code == 503


def _engine_child(server_pid: int) -> int:
    """The engine process among the server's children (the other is multiprocessing's resource tracker)."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        for task in Path(f"/proc/{server_pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
                    return int(pid)
        time.sleep(0.1)
    raise AssertionError("no engine process")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_server_process_stays_torch_free_and_its_engine_does_not_outlive_it(tiny_model):
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepfleet"), "serve", str(tiny_model), "--host", "127.0.0.1",
           "--port", str(port), "--set", "warmup_requests=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = _engine_child(proc.pid)
        end = time.monotonic() + 120
        while not _ready(f"http://127.0.0.1:{port}"):
            assert time.monotonic() < end and proc.poll() is None, "server did not become ready"
            time.sleep(0.2)
        # outputs and stats crossed (the warm-up ran); torch (and CUDA) live in the engine process only
        assert b"libtorch" in Path(f"/proc/{child}/maps").read_bytes()
        assert b"libtorch" not in Path(f"/proc/{proc.pid}/maps").read_bytes()
        proc.send_signal(signal.SIGKILL)  # no drain, no clean-up: as the OOM killer would
        proc.wait()
        end = time.monotonic() + 20
        while not _gone(child):
            assert time.monotonic() < end, "engine process still running after its server was killed"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_engine_process_ignores_sigterm_the_server_drains(tiny_model):
    """systemd sends SIGTERM to every process of the unit: the engine must keep serving the drain."""
    with live_server(settings_for(tiny_model)) as server:
        os.kill(server.state.engine.driver.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert httpx.get(server.url + "/healthz").status_code == 200
        assert json.loads(httpx.get(server.url + "/readyz").text) == {"status": "ready"}
        assert _completion(server.url, temperature=0)["finish_reason"] == "length"


def test_deltas_cross_as_plain_data():
    # pickled for every running request at every step: no class of ours inside (rebuilding an instance per request
    # cost the server's event loop ~7x the time of a tuple)
    encoder = _DeltaEncoder()
    encoder.encode([_output("a", "He", [5], None)])
    wire = pickle.dumps(encoder.encode([_output("a", "Hello", [5, 6], "stop"), _output("b", "x", [9], None)]))
    assert b"deepfleet" not in wire


def test_events_read_in_pieces_come_out_whole_and_in_order():
    # what the engine process sends, read back as the event loop reads the pipe: whatever bytes are there
    sent = [{"step": 0}, list(range(40_000)), "x" * 70_000, ("end", None)]  # two larger than a pipe's buffer
    reader, writer = multiprocessing.Pipe(duplex=False)
    feeder = threading.Thread(target=lambda: [writer.send(obj) for obj in sent])
    feeder.start()
    unread, got, rng = bytearray(), [], random.Random(0)
    while len(got) < len(sent):
        unread += os.read(reader.fileno(), rng.choice([1, 3, 4, 7, 100, 5000]))
        got.extend(_frames(unread))
    feeder.join()
    assert got == sent and not unread


def test_event_pipes_hold_hundreds_of_steps_before_the_engine_blocks():
    # 256 streams' deltas are ~12 KB a step: the default 64 KiB pipe would stall the engine behind a busy API process
    # after ~5 steps
    events, child_events = event_pipe(multiprocessing.get_context("spawn"))
    try:
        assert fcntl.fcntl(child_events.fileno(), fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        events.close()
        child_events.close()
