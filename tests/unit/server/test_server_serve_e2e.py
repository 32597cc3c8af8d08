"""The must-show checks against the real `deepfleet serve` command (`python -m deepfleet serve`, its own process,
on loopback) with the official openai client, on a model directory re-saved by transformers' save_pretrained
(chat_template.jinja): chat, tool calls streamed and not, and 100 strict json_schema answers that parse and
validate."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest
from server_helpers import MODEL_NAME, free_port

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}},
          "required": ["ok", "size"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def serve(saved_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepfleet", "serve", str(saved_dir), "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", MODEL_NAME, "--max-model-len", "256", "--max-num-seqs", "32",
         "--max-concurrent", "64", "--set", "warmup_requests=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise TimeoutError("deepfleet serve did not become ready")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_chat_on_a_save_pretrained_dir(serve):
    client = openai.OpenAI(base_url=serve + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


def test_tool_calls_streamed_and_not(serve):
    client = openai.OpenAI(base_url=serve + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       max_tokens=80, seed=1)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=40,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True, seed=2)
    deltas = [d for chunk in stream for c in chunk.choices for d in c.delta.tool_calls or []]
    # OpenAI's shape: the id and name first, then argument pieces
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_") and len(deltas) > 1
    assert all(d.function.name is None and d.id is None and d.index == 0 for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas))["city"] in ("Paris", "Oslo")


def test_json_schema_strict_100_requests_parse_and_validate(serve):
    client = openai.AsyncOpenAI(base_url=serve + "/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "gpu", "schema": SCHEMA, "strict": True}}

    async def run():
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "JSON please"}], max_tokens=48, seed=i,
                temperature=1.0, response_format=fmt) for i in range(100)))
        finally:
            await client.close()

    answers = asyncio.run(run())
    for r in answers:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert len({r.choices[0].message.content for r in answers}) > 1
