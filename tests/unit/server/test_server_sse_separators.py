"""Model output is arbitrary Unicode. U+2028, U+2029 and U+0085 are line breaks to `str.splitlines`, which is how
httpx's `aiter_lines` (and the SSE helpers built on it) split a stream: written raw into a `data:` line they cut
the JSON event in two. Every event must stay one line for such clients, and the text must arrive intact."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from server_fakes import ScriptedEngine
from server_helpers import MODEL_NAME, live_server, settings_for

# every character str.splitlines() breaks at, between ordinary text
SEPARATORS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
SCRIPT = "a\u2028b\u2029c\x85d" + "".join(f"{c}." for c in SEPARATORS) + "\r\n end"


@pytest.fixture(scope="module")
def scripted(tiny_model):
    engine = ScriptedEngine(SCRIPT)
    with live_server(settings_for(tiny_model, warmup_requests=0, engine_process=False, reasoning_parser="none"),
                     lambda _s: engine) as server:
        yield server


async def _stream_lines(url: str, path: str, body: dict) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            return [line async for line in r.aiter_lines()]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_every_sse_event_is_one_line_for_splitlines_clients(scripted, path):
    body = {"model": MODEL_NAME, "max_tokens": len(SCRIPT), "stream": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    lines = [line for line in asyncio.run(_stream_lines(scripted.url, path, body)) if line]
    assert lines[-1] == "data: [DONE]"
    texts = []
    for line in lines[:-1]:
        assert line.startswith("data: "), repr(line)
        event = json.loads(line.removeprefix("data: "))  # a cut event would not parse
        for choice in event["choices"]:
            texts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    assert "".join(texts) == SCRIPT


def test_non_streaming_answer_carries_the_same_text(scripted):
    r = httpx.post(scripted.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi",
                                                           "max_tokens": len(SCRIPT)}, timeout=30)
    assert r.json()["choices"][0]["text"] == SCRIPT
