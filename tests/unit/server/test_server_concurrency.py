"""Many clients at once, and clients that leave: the real server, real engine, tiny model, loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
from server_helpers import MODEL_NAME

CLIENTS = 200
MAX_TOKENS = 8
PROMPTS = ["Hello world", "The quick brown fox", "GPUs and CPUs", "Numbers: 1 2 3", "Think step by step"]


def _body(i: int, stream: bool) -> dict:
    return {"model": MODEL_NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "seed": i,
            "ignore_eos": True, "logprobs": 0, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}


async def _stream_one(client: httpx.AsyncClient, i: int) -> dict:
    """Reads the raw SSE stream and checks its framing: data events, one usage event, then [DONE] last."""
    text, tokens, finish, usage, done = [], [], None, None, False
    async with client.stream("POST", "/v1/completions", json=_body(i, True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done, line
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if event["choices"]:
                choice = event["choices"][0]
                text.append(choice["text"])
                tokens += choice["logprobs"]["tokens"]
                finish = choice.get("finish_reason") or finish
            else:
                usage = event["usage"]
    assert done
    return {"text": "".join(text), "tokens": tokens, "finish": finish, "usage": usage}


async def _complete_one(client: httpx.AsyncClient, i: int) -> dict:
    r = await client.post("/v1/completions", json=_body(i, False))
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    return {"text": choice["text"], "tokens": choice["logprobs"]["tokens"], "finish": choice["finish_reason"],
            "usage": body["usage"]}


async def _all(url: str, fn) -> list[dict]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        return await asyncio.gather(*(fn(client, i) for i in range(CLIENTS)))


def test_200_concurrent_streams_lose_and_duplicate_no_token(server):
    before = server.metrics()
    t0 = time.monotonic()
    streamed = asyncio.run(_all(server.url, _stream_one))
    elapsed = time.monotonic() - t0
    whole = asyncio.run(_all(server.url, _complete_one))
    for i, (s, w) in enumerate(zip(streamed, whole, strict=True)):
        assert s["usage"]["completion_tokens"] == MAX_TOKENS == len(s["tokens"]), i
        assert s["finish"] == "length"
        # token-identical to the non-streaming answer for the same seed, though batched differently
        assert (s["tokens"], s["text"]) == (w["tokens"], w["text"]), i
    after = server.metrics()
    generated = after["deepseek_inference_generated_tokens_total"] - before["deepseek_inference_generated_tokens_total"]
    assert generated == 2 * CLIENTS * MAX_TOKENS
    ok = 'deepseek_inference_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[ok] - before.get(ok, 0) == 2 * CLIENTS
    assert after["deepseek_inference_admitted_requests"] == 0 and after["deepseek_inference_kv_cache_usage_ratio"] == 0
    print(f"{CLIENTS} concurrent streams x {MAX_TOKENS} tokens in {elapsed:.1f} s")


def _wait_idle(server, timeout: float = 30) -> dict[str, float]:
    end = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["deepseek_inference_running_requests"], m["deepseek_inference_waiting_requests"],
                m["deepseek_inference_admitted_requests"], m["deepseek_inference_kv_cache_usage_ratio"]) == (0, 0, 0, 0)
        if idle or time.monotonic() > end:
            return m
        time.sleep(0.05)


def test_stream_disconnect_aborts_the_request_and_frees_kv_blocks(server):
    before = server.metrics()
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as client, client.stream(
        "POST", "/v1/chat/completions", json=body
    ) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 5:
                busy = server.metrics()
                assert busy["deepseek_inference_running_requests"] == 1
                assert busy["deepseek_inference_kv_cache_usage_ratio"] > 0
                break  # leaving the line iterator mid-body makes httpx close the connection
    after = _wait_idle(server)
    assert after["deepseek_inference_running_requests"] == 0
    assert after["deepseek_inference_kv_cache_usage_ratio"] == 0
    assert after["deepseek_inference_admitted_requests"] == 0
    generated = after["deepseek_inference_generated_tokens_total"] - before["deepseek_inference_generated_tokens_total"]
    assert generated < 400, "the request ran to the end instead of being aborted"
    gone = 'deepseek_inference_requests_total{endpoint="/v1/chat/completions",status="499"}'
    assert after[gone] - before.get(gone, 0) == 1


def test_non_streaming_disconnect_aborts_too(server):
    before = server.metrics()
    body = json.dumps({"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True})
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        end = time.monotonic() + 10
        while server.metrics()["deepseek_inference_running_requests"] == 0 and time.monotonic() < end:
            time.sleep(0.02)
    after = _wait_idle(server)
    assert after["deepseek_inference_kv_cache_usage_ratio"] == 0 and after["deepseek_inference_admitted_requests"] == 0
    generated = after["deepseek_inference_generated_tokens_total"] - before["deepseek_inference_generated_tokens_total"]
    assert generated < 400
    gone = 'deepseek_inference_requests_total{endpoint="/v1/completions",status="499"}'
    assert after[gone] - before.get(gone, 0) == 1
