"""The remaining OpenAI/vLLM request parameters against the real server (real engine, tiny model): logit_bias,
min_tokens, echo (with logprobs: the prompt's), batched prompts, prompt_logprobs (streamed too), /tokenize and
/detokenize; bad values are 400s naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest
from server_helpers import MODEL_NAME

from deepfleet.models.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Tell me about GPUs."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok(server) -> Tokenizer:
    return Tokenizer(server.settings.model)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL_NAME} | body, timeout=60)


def test_logit_bias_forces_and_bans_tokens(client, tok):
    (target,) = tok.encode(" fox", add_special_tokens=False)  # one token of the tiny vocabulary
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=1.0, seed=1,
                                  logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == " fox" * 4
    base = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    first = tok.encode(base.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=6, temperature=0,
                                       logit_bias={str(first): -100}, extra_body={"ignore_eos": True})
    assert tok.encode(banned.choices[0].text, add_special_tokens=False)[0] != first


def test_min_tokens_masks_the_end_token_until_reached(server, tok):
    eos = sorted(tok.eos_token_ids)[0]
    # EOS pushed to the top: without min_tokens the answer ends at once
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "logit_bias": {str(eos): 100}}
    short = _post(server, "/v1/completions", body).json()
    assert short["usage"]["completion_tokens"] == 1 and short["choices"][0]["finish_reason"] == "stop"
    held = _post(server, "/v1/completions", body | {"min_tokens": 5}).json()
    assert held["usage"]["completion_tokens"] == 6 and held["choices"][0]["finish_reason"] == "stop"


def test_echo_prepends_the_prompt_streamed_and_not(client):
    kw = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 5, "seed": 4, "extra_body": {
        "ignore_eos": True}}
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(echo=True, **kw).choices[0].text
    assert echoed == "The quick brown fox" + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kw)
                       if c.choices)
    assert streamed == echoed


def test_batched_prompts_each_get_n_choices_in_order(client, tok):
    prompts = ["Hello world", "The quick brown fox"]
    ids = tok.encode("GPUs, CPUs")
    r = client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=4, seed=9,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model=MODEL_NAME, prompt=pr, n=2, max_tokens=4, seed=9,
                                       extra_body={"ignore_eos": True}) for pr in prompts]
    assert [c.text for c in r.choices] == [c.text for a in alone for c in a.choices]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=3, seed=2,
                                       extra_body={"ignore_eos": True})
    assert len(by_ids.choices) == 2 and by_ids.usage.prompt_tokens == 2 * len(ids)


def test_tokenize_and_detokenize(server, tok):
    r = _post(server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == server.state.max_model_len and "".join(r["token_strs"][1:]) == "Hello world"
    chat = _post(server, "/tokenize", {"messages": MESSAGES}).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    back = _post(server, "/detokenize", {"tokens": r["tokens"]}).json()
    assert back == {"prompt": tok.decode(r["tokens"], skip_special_tokens=False)}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias.x"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"3": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": [[1, 2], [99999]]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 9, "n": 2}, "prompt"),
    ("/tokenize", {"prompt": "hi", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [99999]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_bad_values_are_400_naming_the_field(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.text


def test_prompt_logprobs_equal_transformers_over_the_prompt(server, tok):
    """vLLM's prompt_logprobs: per prompt token after the first, its logprob and rank under the tokens before it
    plus the top k; expected from HF transformers' forward over the prompt (float32, as the server's CPU engine).
    The prompt is longer than a prefill chunk would be on a loaded server and repeats: prefix-cache hits would
    leave positions unscored, so such requests skip the cache."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    prompt = [(i * 37) % 500 + 10 for i in range(40)]
    model = transformers.AutoModelForCausalLM.from_pretrained(server.settings.model, dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for _ in range(2):  # the second time the prompt's blocks are in the prefix cache
        r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}).json()
        (choice,) = r["choices"]
        got = choice["prompt_logprobs"]
        assert len(got) == len(prompt) and got[0] is None
        for i in range(1, len(prompt)):
            row = lp[i - 1]
            entry = got[i][str(prompt[i])]
            assert abs(entry["logprob"] - row[prompt[i]].item()) < 1e-4
            assert entry["rank"] == int((row > row[prompt[i]]).sum()) + 1
            assert entry["decoded_token"] == server.state.token_text(prompt[i])
            top = row.topk(2)
            for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), 1):
                assert got[i][str(tid)]["rank"] == rank and abs(got[i][str(tid)]["logprob"] - value) < 1e-4
    chat = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0})
    body = chat.json()
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])  # k = 0: the prompt token alone


PROMPT_IDS = [(i * 37) % 500 + 10 for i in range(40)]


@pytest.fixture(scope="module")
def prompt_lp(server):
    """HF transformers' log-softmax over PROMPT_IDS (float32, as the server's CPU engine): row i scores token i+1."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(server.settings.model, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT_IDS])).logits[0].float(), dim=-1)


def _same_prompt_logprobs(a, b):
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:], strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k]["rank"], x[k]["decoded_token"]) == (y[k]["rank"], y[k]["decoded_token"])
            assert x[k]["logprob"] == pytest.approx(y[k]["logprob"], abs=1e-5)


def test_echo_with_logprobs_scores_the_prompt_streamed_and_not(client, server, tok, prompt_lp):
    """OpenAI's way of scoring a prompt (what lm-eval-harness's loglikelihood requests send): echo + logprobs. The
    choice's logprobs lead with the prompt's tokens, the first without a logprob, each other with its logprob and
    top k under the tokens before it (expected from transformers), then the output's as without echo, their text
    offsets after the echoed text. Streamed, the echo comes with the first token: joined, the same answer."""
    token_text = server.state.token_text
    kw = {"model": MODEL_NAME, "prompt": PROMPT_IDS, "max_tokens": 3, "temperature": 0, "logprobs": 2,
          "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**kw).choices[0]
    choice = client.completions.create(echo=True, **kw).choices[0]
    echoed = tok.decode(PROMPT_IDS, skip_special_tokens=False)  # a token-id prompt echoes as its text
    assert choice.text == echoed + plain.text
    lps, n = choice.logprobs, len(PROMPT_IDS)
    assert lps.tokens[:n] == [token_text(t) for t in PROMPT_IDS]
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    for i in range(1, n):
        row = prompt_lp[i - 1]
        assert lps.token_logprobs[i] == pytest.approx(row[PROMPT_IDS[i]].item(), abs=1e-4)
        top = row.topk(2)
        want = {token_text(t): v for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)}
        assert lps.top_logprobs[i].keys() == want.keys()
        assert all(lps.top_logprobs[i][k] == pytest.approx(v, abs=1e-4) for k, v in want.items())
    assert lps.text_offset[:n] == [sum(len(token_text(t)) for t in PROMPT_IDS[:i]) for i in range(n)]
    assert lps.tokens[n:] == plain.logprobs.tokens
    assert lps.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lps.text_offset[n:] == [len(echoed) + o for o in plain.logprobs.text_offset]
    assert choice.model_extra.get("prompt_logprobs") is None  # vLLM's field only when asked for

    chunks = [c.choices[0] for c in client.completions.create(echo=True, stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    assert chunks[0].text.startswith(echoed)
    parts = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in parts for t in lp.tokens] == lps.tokens
    assert [o for lp in parts for o in lp.text_offset] == lps.text_offset
    streamed = [x for lp in parts for x in lp.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lps.token_logprobs[1:], abs=1e-5)

    # with vLLM's prompt_logprobs as well, the prompt is scored once and each field shows its own k
    both = client.completions.create(echo=True, **{**kw, "extra_body": {"ignore_eos": True, "prompt_logprobs": 0}})
    field = both.choices[0].model_extra["prompt_logprobs"]
    assert all(list(e) == [str(t)] for e, t in zip(field[1:], PROMPT_IDS[1:], strict=True))  # k=0: the token alone
    def keys(tops):
        return [t if t is None else t.keys() for t in tops[:n]]

    assert keys(both.choices[0].logprobs.top_logprobs) == keys(lps.top_logprobs)  # still echo's k=2


def test_prompt_logprobs_streamed_with_the_first_chunk(client, prompt_lp):
    """vLLM refuses prompt_logprobs with stream; here they come once per choice, with its first chunk carrying
    output (completions: in the choice; chat: at the chunk's top level, as the non-streamed answer has them),
    equal to the non-streamed ones."""
    extra = {"ignore_eos": True, "prompt_logprobs": 1}
    kw = {"model": MODEL_NAME, "prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "extra_body": extra}
    whole = client.completions.create(**kw).choices[0].model_extra["prompt_logprobs"]
    got = whole[5][str(PROMPT_IDS[5])]["logprob"]
    assert got == pytest.approx(prompt_lp[4][PROMPT_IDS[5]].item(), abs=1e-4)
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    carried = [c.model_extra.get("prompt_logprobs") for c in chunks]
    assert carried[0] is not None and all(x is None for x in carried[1:])
    _same_prompt_logprobs(carried[0], whole)

    chat = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "extra_body": extra}
    whole = client.chat.completions.create(**chat).model_extra["prompt_logprobs"]
    carried = [c.model_extra.get("prompt_logprobs") for c in client.chat.completions.create(stream=True, **chat)]
    assert sum(x is not None for x in carried) == 1
    _same_prompt_logprobs(next(x for x in carried if x is not None), whole)


# OpenAI's API declares these nullable (null = the default); clients send explicit nulls for fields they leave unset
NULLS = {"temperature": None, "top_p": None, "n": None, "stream": None, "presence_penalty": None,
         "frequency_penalty": None, "top_k": None, "min_p": None, "repetition_penalty": None, "min_tokens": None}


@pytest.mark.parametrize(("path", "body", "extra"), [
    ("/v1/chat/completions", {"messages": MESSAGES}, {"logprobs": None}),
    ("/v1/completions", {"prompt": "Tell me about GPUs."}, {"echo": None}),
])
def test_null_fields_are_served_as_left_out(server, path, body, extra):
    body = {**body, "max_tokens": 6, "seed": 5, "ignore_eos": True}
    plain = _post(server, path, body)
    nulls = _post(server, path, {**body, **NULLS, **extra})
    assert plain.status_code == nulls.status_code == 200, nulls.text
    assert nulls.json()["choices"] == plain.json()["choices"]  # the same sampling: every default kept
    r = _post(server, path, {**body, "model": None})  # a required field stays required
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
