"""The real server (real engine, tiny model) over loopback HTTP, driven by the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import MODEL_NAME

import deepfleet
from deepfleet.server.reasoning import split_reasoning

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about GPUs."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].model_extra["max_model_len"] == server.state.max_model_len
    card = client.models.retrieve(MODEL_NAME)  # GET /v1/models/{model}
    assert (card.id, card.object, card.owned_by) == (MODEL_NAME, "model", models.data[0].owned_by)
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("deepseek-ai/DeepSeek-R1")  # a name with a slash reaches the route, then 404
    assert exc.value.body["code"] == "model_not_found"


def test_chat_completion_has_usage_finish_reason_and_reasoning_split(client, server):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=12, seed=3, temperature=1.0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL_NAME and r.id.startswith("chatcmpl-")
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The tiny model's template opens <think>, so the output starts as reasoning.
    reasoning = choice.message.model_extra["reasoning_content"]
    assert reasoning is not None
    # Same request, raw: the split is exactly the parser's split of the raw text.
    raw = client.completions.create(
        model=MODEL_NAME, prompt=_chat_prompt(server), max_tokens=12, seed=3, temperature=1.0
    ).choices[0].text
    assert (reasoning, choice.message.content) == split_reasoning(raw, in_reasoning=True)


def _chat_prompt(server) -> list[int]:
    tok = server.state.tokenizer
    return tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False)


def test_completion_with_logprobs_and_echoed_token_counts(client):
    r = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=6, logprobs=3,
                                  seed=1, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length"
    assert r.usage.completion_tokens == 6 == len(c.logprobs.tokens) == len(c.logprobs.token_logprobs)
    assert all(len(top) <= 3 for top in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)


def test_chat_logprobs_n_and_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=5, n=3, seed=7,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    for c in r.choices:
        assert c.finish_reason == "length" and len(c.logprobs.content) == 5
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
    # seed + i per choice: the three choices are different draws, reproducible as a set
    again = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=5, n=3,
                                           seed=7, extra_body={"ignore_eos": True})
    assert [c.message.model_extra["reasoning_content"] for c in again.choices] == [
        c.message.model_extra["reasoning_content"] for c in r.choices
    ]


def test_stop_string_ends_generation_and_is_not_returned(client):
    base = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=16, seed=5,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:5]
    assert stop, "the tiny model produced too little text for this test"
    r = client.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=16, seed=5, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_streaming_is_token_identical_to_non_streaming(client, endpoint):
    if endpoint == "chat":
        kwargs = {"messages": MESSAGES, "max_tokens": 20, "seed": 11, "n": 2, "logprobs": True}
        create = client.chat.completions.create
    else:
        kwargs = {"prompt": "Numbers: 0 1 2", "max_tokens": 20, "seed": 11, "n": 2, "logprobs": 1}
        create = client.completions.create
    full = create(model=MODEL_NAME, **kwargs)
    chunks = list(create(model=MODEL_NAME, stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    for choice in full.choices:
        mine = [c.choices[0] for c in chunks[:-1] if c.choices and c.choices[0].index == choice.index]
        assert mine[-1].finish_reason == choice.finish_reason
        if endpoint == "chat":
            content = "".join(c.delta.content or "" for c in mine)
            reasoning = "".join(c.delta.model_extra.get("reasoning_content") or "" for c in mine)
            assert (reasoning, content) == (choice.message.model_extra["reasoning_content"],
                                            choice.message.content)
            streamed = [t.token for c in mine if c.logprobs for t in c.logprobs.content]
            assert streamed == [t.token for t in choice.logprobs.content]
        else:
            assert "".join(c.text for c in mine) == choice.text
            assert [t for c in mine if c.logprobs for t in c.logprobs.tokens] == choice.logprobs.tokens


def test_usage_chunk_only_when_asked(client):
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason is not None


def test_unknown_model_is_an_openai_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert exc.value.body["param"] == "model" and exc.value.body["code"] == "model_not_found"


def test_health_ready_and_metrics_after_traffic(server, client):
    client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # vLLM's path for the same probe
    assert httpx.get(server.url + "/version").json() == {"version": deepfleet.__version__}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    m = server.metrics()
    ok = 'deepseek_inference_requests_total{endpoint="/v1/completions",status="200"}'
    assert m[ok] >= 1
    assert m['deepseek_inference_latency_seconds_count{endpoint="/v1/completions",status="200"}'] == m[ok]
    assert m["deepseek_inference_generated_tokens_total"] > 0 and m["deepseek_inference_prompt_tokens_total"] > 0
    assert m["deepseek_server_ready"] == 1
    for name in ("deepseek_inference_ttft_seconds_count", "deepseek_inference_tpot_seconds_count",
                 "deepseek_inference_queue_time_seconds_count"):
        assert any(k.startswith(name) for k in m), name
