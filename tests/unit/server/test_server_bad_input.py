"""Bad requests get a 4xx with an OpenAI-shaped error naming the field; never a 500, never a dead server."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import MODEL_NAME

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}


def _with(base: dict, **changes) -> bytes:
    body = {**base, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


CASES = [
    # (id, path, raw body, expected status, expected param or None)
    ("malformed-json", "/v1/chat/completions", b'{"model": "tiny-r1", "messages": [', 400, None),
    ("not-an-object", "/v1/chat/completions", b"[1, 2, 3]", 400, None),
    ("nan", "/v1/completions", b'{"model": "tiny-r1", "prompt": "x", "temperature": NaN}', 400, None),
    ("invalid-utf8", "/v1/completions", b'{"model": "tiny-r1", "prompt": "\xff\xfe"}', 400, None),
    ("lone-surrogate", "/v1/completions", b'{"model": "tiny-r1", "prompt": "\\ud800"}', 400, None),
    ("unknown-field", "/v1/chat/completions", _with(CHAT, frobnicate=1), 400, "frobnicate"),
    ("unknown-message-field", "/v1/chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": "x", "colour": "red"}]), 400, "messages[0].colour"),
    ("wrong-type-max-tokens", "/v1/chat/completions", _with(CHAT, max_tokens="5"), 400, "max_tokens"),
    ("wrong-type-temperature", "/v1/completions", _with(COMPLETION, temperature="hot"), 400, "temperature"),
    ("bool-as-int", "/v1/completions", _with(COMPLETION, n=True), 400, "n"),
    ("negative-max-tokens", "/v1/completions", _with(COMPLETION, max_tokens=-1), 400, "max_tokens"),
    ("zero-max-tokens", "/v1/chat/completions", _with(CHAT, max_tokens=0), 400, "max_tokens"),
    ("huge-max-tokens", "/v1/completions", _with(COMPLETION, max_tokens=10**30), 400, "max_tokens"),
    ("huge-max-completion-tokens", "/v1/chat/completions",
     _with(CHAT, max_tokens=..., max_completion_tokens=10**6), 400, "max_tokens"),
    ("prompt-beyond-context", "/v1/completions", _with(COMPLETION, prompt="hello " * 2000), 400, "prompt"),
    ("messages-beyond-context", "/v1/chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": "hello " * 2000}], max_tokens=...), 400, "messages"),
    ("token-ids-beyond-vocab", "/v1/completions", _with(COMPLETION, prompt=[1, 10**9]), 400, "prompt"),
    ("empty-messages", "/v1/chat/completions", _with(CHAT, messages=[]), 400, "messages"),
    ("empty-prompt", "/v1/completions", _with(COMPLETION, prompt=""), 400, "prompt"),
    ("missing-messages", "/v1/chat/completions", _with(CHAT, messages=...), 400, "messages"),
    ("missing-model", "/v1/completions", _with(COMPLETION, model=...), 400, "model"),
    ("bad-role", "/v1/chat/completions", _with(CHAT, messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages[0].role"),
    ("image-part", "/v1/chat/completions",
     _with(CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
     "messages[0].content[0].type"),
    ("unknown-model", "/v1/chat/completions", _with(CHAT, model="gpt-4o"), 404, "model"),
    ("n-too-large", "/v1/completions", _with(COMPLETION, n=1000), 400, "n"),
    ("top-logprobs-too-large", "/v1/chat/completions", _with(CHAT, logprobs=True, top_logprobs=50), 400,
     "top_logprobs"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", _with(CHAT, top_logprobs=2), 400, "top_logprobs"),
    ("tool-without-function", "/v1/chat/completions", _with(CHAT, tools=[{"type": "function"}]), 400,
     "tools[0].function"),
    ("json-schema-format-without-schema", "/v1/chat/completions",
     _with(CHAT, response_format={"type": "json_schema"}), 400, "response_format"),
    ("stream-options-without-stream", "/v1/completions", _with(COMPLETION, stream_options={"include_usage": True}),
     400, "stream_options"),
    ("empty-stop", "/v1/completions", _with(COMPLETION, stop=[""]), 400, "stop"),
    ("temperature-out-of-range", "/v1/completions", _with(COMPLETION, temperature=5), 400, "temperature"),
    ("negative-stop-token", "/v1/completions", _with(COMPLETION, stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("seed-beyond-int64", "/v1/completions", _with(COMPLETION, seed=2**70), 400, "seed"),
    ("priority-out-of-range", "/v1/completions", _with(COMPLETION, priority=10**9), 400, "priority"),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if param:
        assert param in error["message"]
    return error


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_a_4xx_naming_the_field(http, path, body, status, param):
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, status, param)


def test_oversize_body_is_413_before_and_while_reading(http, server):
    limit = server.settings.max_body_bytes
    big = _with(COMPLETION, prompt="x" * (limit + 10))
    assert_openai_error(http.post("/v1/completions", content=big), 413, None)

    def chunks():  # no Content-Length: the limit must hold while streaming the body in
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    assert_openai_error(http.post("/v1/completions", content=chunks()), 413, None)


def test_bad_priority_header(http):
    r = http.post("/v1/completions", content=_with(COMPLETION), headers={"X-Priority": "urgent"})
    assert_openai_error(r, 400, "X-Priority")


def test_routing_errors_are_openai_shaped(http):
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_ignored_openai_fields_are_accepted(http):
    """What the OpenAI SDK and LangChain send but does not change generation is accepted (README lists it)."""
    body = _with(CHAT, user="u1", metadata={"a": "b"}, store=False, service_tier="auto", parallel_tool_calls=False,
                 tool_choice="none", tools=[], response_format={"type": "text"}, logit_bias={}, seed=1,
                 messages=[{"role": "developer", "content": "Be terse."},
                           {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"},
                           {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
                           {"role": "user", "content": "again"}])
    r = http.post("/v1/chat/completions", content=body)
    assert r.status_code == 200, r.text


def test_server_still_serves_after_all_that(http):
    assert http.get("/healthz").status_code == 200
    r = http.post("/v1/completions", content=_with(COMPLETION))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
