"""Overload control, timeouts, readiness and engine failure, over real HTTP. These need exact control of when
the engine advances, so they use GatedFakeEngine (server_fakes.py); the rest of the suite uses the real one."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
from server_fakes import GatedFakeEngine
from server_helpers import MODEL_NAME, live_server, settings_for

from deepfleet.server.lifecycle import run

BODY = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3}


def _serve(tiny_model, engine: GatedFakeEngine, **settings):
    # fakes live in this process (the tests reach into them): the engine runs in a thread of the server
    return live_server(settings_for(tiny_model, warmup_requests=0, engine_process=False, **settings),
                       lambda _s: engine)


async def _wait_for(predicate, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_full_queue_is_refused_with_retry_after_then_everyone_admitted_finishes(tiny_model):
    engine = GatedFakeEngine()
    with _serve(tiny_model, engine, max_concurrent=1, max_queue=1, retry_after_s=7) as server:
        admission = lambda: server.state.engine.admission  # noqa: E731

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                first = asyncio.create_task(client.post("/v1/completions", json=BODY))
                await _wait_for(lambda: admission().active == 1)
                second = asyncio.create_task(client.post("/v1/completions", json=BODY))
                await _wait_for(lambda: admission().queued == 1)
                refused = await client.post("/v1/completions", json=BODY)
                engine.gate.set()
                return refused, await first, await second

        refused, first, second = asyncio.run(scenario())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "7"
        assert refused.json()["error"]["code"] == "queue_full"
        assert first.status_code == second.status_code == 200
        m = server.metrics()
        assert m['deepseek_inference_requests_total{endpoint="/v1/completions",status="429"}'] == 1
        assert m["deepseek_inference_admitted_requests"] == 0 and m["deepseek_inference_admission_queue_requests"] == 0


def test_queue_is_served_most_urgent_first_and_priority_reaches_the_engine(tiny_model):
    engine = GatedFakeEngine()
    with _serve(tiny_model, engine, max_concurrent=1, max_queue=8) as server:
        queued = lambda: server.state.engine.admission.queued  # noqa: E731

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                tasks = [asyncio.create_task(client.post("/v1/completions", json=BODY))]
                await _wait_for(lambda: len(engine.added) == 1)
                for n, (field, header) in enumerate([(5, None), (None, "-5"), (0, None)], start=1):
                    body = BODY if field is None else {**BODY, "priority": field}
                    headers = {"X-Priority": header} if header else {}
                    tasks.append(asyncio.create_task(client.post("/v1/completions", json=body, headers=headers)))
                    await _wait_for(lambda n=n: queued() == n)
                engine.gate.set()
                return await asyncio.gather(*tasks)

        assert all(r.status_code == 200 for r in asyncio.run(scenario()))
        assert [priority for _, priority in engine.added] == [0, -5, 0, 5]


def test_waiting_past_the_request_timeout_is_a_503(tiny_model):
    engine = GatedFakeEngine()
    with _serve(tiny_model, engine, max_concurrent=1, request_timeout_s=0.3) as server:
        admission = server.state.engine.admission
        admission.active = 1  # every slot taken, by something that outlives the request's deadline
        waited = httpx.post(server.url + "/v1/completions", json=BODY, timeout=30)
        assert waited.status_code == 503 and waited.json()["error"]["code"] == "queue_timeout"
        assert "retry-after" in waited.headers and admission.queued == 0 and engine.added == []
        admission.active = 0


@pytest.mark.parametrize("stream", [False, True])
def test_request_past_its_deadline_ends_with_timeout_and_is_aborted(tiny_model, stream):
    engine = GatedFakeEngine()  # the gate stays shut: the engine never advances
    with _serve(tiny_model, engine, request_timeout_s=0.3) as server:
        r = httpx.post(server.url + "/v1/completions", json={**BODY, "stream": stream}, timeout=30)
        assert r.status_code == 200
        if stream:
            assert '"finish_reason":"timeout"' in r.text and r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["choices"][0]["finish_reason"] == "timeout"
        end = time.monotonic() + 5
        while engine.aborted != [engine.added[0][0]]:  # the server aborted it in the engine (frees its KV)
            assert time.monotonic() < end
            time.sleep(0.01)


def test_not_ready_until_loaded_and_warm(tiny_model):
    engine, loaded = GatedFakeEngine(), threading.Event()
    engine.gate.set()

    def slow_factory(_settings):
        loaded.wait(10)
        return engine

    settings = settings_for(tiny_model, warmup_requests=2, engine_process=False)
    with live_server(settings, slow_factory, wait_ready=False) as server:
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        r = httpx.get(server.url + "/readyz")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(server.url + "/v1/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and "retry-after" in r.headers
        loaded.set()
        end = time.monotonic() + 10
        while httpx.get(server.url + "/readyz").status_code != 200:
            assert time.monotonic() < end
            time.sleep(0.02)
        assert len(engine.added) == 2  # the warm-up requests ran before ready
        assert httpx.post(server.url + "/v1/completions", json=BODY).status_code == 200


def test_draining_refuses_new_requests(tiny_model):
    engine = GatedFakeEngine()
    with _serve(tiny_model, engine) as server:
        server.state.draining = True
        assert httpx.get(server.url + "/readyz").json() == {"status": "draining"}
        r = httpx.post(server.url + "/v1/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("stream", [False, True])
def test_engine_crash_fails_requests_cleanly_and_health_turns_red(tiny_model, stream):
    engine = GatedFakeEngine()
    with _serve(tiny_model, engine) as server:
        engine.fail = True
        r = httpx.post(server.url + "/v1/completions", json={**BODY, "stream": stream}, timeout=30)
        if stream:  # headers were sent: the error arrives as an SSE event
            assert r.status_code == 200 and '"code":"engine_unavailable"' in r.text
        else:
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert httpx.get(server.url + "/healthz").status_code == 503
        assert httpx.get(server.url + "/readyz").json() == {"status": "failed"}
        assert httpx.post(server.url + "/v1/completions", json=BODY).status_code == 503


def test_load_failure_reports_failed(tiny_model):
    def broken(_settings):
        raise FileNotFoundError("config.json missing")

    with live_server(settings_for(tiny_model, engine_process=False), broken) as server:
        r = httpx.get(server.url + "/healthz")
        assert r.status_code == 503 and "config.json missing" in r.json()["error"]


def test_startup_error_is_reported_by_its_message_without_a_trace(tiny_model, caplog):
    from deepfleet.engine.errors import StartupError

    message = ("out of GPU memory while capturing the CUDA graph for decode batch 992 (max_num_seqs 1024): lower "
               "max_num_seqs or gpu_memory_utilization, or set enforce_eager")

    def no_room(_settings):
        raise StartupError(message)

    with caplog.at_level("ERROR"), live_server(settings_for(tiny_model, engine_process=False), no_room) as server:
        r = httpx.get(server.url + "/healthz")
        assert r.status_code == 503 and r.json()["error"] == message
    failed = [rec for rec in caplog.records if "failed to load" in rec.getMessage()]
    assert failed and all(rec.exc_info is None for rec in failed)
    assert all("max_num_seqs" in rec.getMessage() and "gpu_memory_utilization" in rec.getMessage() for rec in failed)


def _run_in_thread(settings, factory) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(code=run(settings, factory)), daemon=True)
    thread.start()
    return thread, result


def test_process_exits_1_when_the_engine_dies_after_ready(tiny_model):
    engine = GatedFakeEngine()
    engine.gate.set()
    settings = settings_for(tiny_model, warmup_requests=1, engine_process=False)
    thread, result = _run_in_thread(settings, lambda _s: engine)
    url = f"http://127.0.0.1:{settings.port}"
    end = time.monotonic() + 20
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/readyz").status_code == 200:
                break
        assert time.monotonic() < end, "not ready"
        time.sleep(0.05)
    engine.fail = True
    assert httpx.post(url + "/v1/completions", json=BODY, timeout=30).status_code == 503
    thread.join(20)
    assert result == {"code": 1}


def test_process_exits_1_when_loading_fails(tiny_model):
    def broken(_settings):
        raise FileNotFoundError("config.json missing")

    thread, result = _run_in_thread(settings_for(tiny_model, engine_process=False), broken)
    thread.join(20)
    assert result == {"code": 1}
