"""Model directories as current transformers and publishers write them: `chat_template.jinja` (and named templates
under `additional_chat_templates/`) instead of tokenizer_config.json's `chat_template`, and generation_config.json
sampling defaults applied to requests that leave them out (as vLLM does)."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from server_helpers import MODEL_NAME, live_server, settings_for

from deepfleet.models.generation_config import generation_defaults
from deepfleet.models.tiny import ASSISTANT, BOS, USER
from deepfleet.models.tokenizer import Tokenizer


def test_save_pretrained_writes_templates_beside_the_config(saved_dir):
    # the layout this test is about: no template left in tokenizer_config.json
    assert "chat_template" not in json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert (saved_dir / "chat_template.jinja").is_file()
    assert (saved_dir / "additional_chat_templates" / "tool_use.jinja").is_file()


def test_tokenizer_reads_the_default_and_named_templates(saved_dir):
    tok = Tokenizer(saved_dir)
    assert sorted(tok.chat_templates) == ["default", "tool_use"]
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == f"{BOS}{USER}Hi{ASSISTANT}<think>\n"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    # tools given: transformers' choice, the tool_use template; tojson keeps non-ASCII as is
    assert tok.apply_chat_template([{"role": "user", "content": "é"}], tools=tools) == (
        BOS + 'TOOLS:[{"type": "function", "function": {"name": "f", "parameters": {}}}]é')
    with pytest.raises(ValueError, match="chat_template: no template named 'x'"):
        tok.apply_chat_template(messages, template="x")


def test_generation_config_defaults_are_read(tiny_model, tmp_path):
    # make_tiny_model writes R1's recommended values
    assert generation_defaults(tiny_model) == {"temperature": 0.6, "top_p": 0.95}
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(
        '{"temperature": 0.3, "max_new_tokens": 7, "eos_token_id": [1, 2]}')
    assert generation_defaults(tmp_path) == {"temperature": 0.3, "max_tokens": 7}


def test_generation_config_eos_ids_end_generation(tiny_model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    cfg = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": [cfg["eos_token_id"], 5]}))
    assert {cfg["eos_token_id"], 5} <= Tokenizer(d).eos_token_ids


@pytest.fixture(scope="module")
def saved_server(saved_dir):
    with live_server(settings_for(saved_dir)) as server:
        yield server


def test_save_pretrained_dir_serves_chat(saved_server):
    client = openai.OpenAI(base_url=saved_server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    # the prompt is the default template's rendering, not the tool template's
    expected = Tokenizer(saved_server.settings.model).encode(f"{BOS}{USER}Hi{ASSISTANT}<think>\n",
                                                             add_special_tokens=False)
    assert r.usage.prompt_tokens == len(expected)


def _sampled_text(url: str, extra: dict) -> list[str]:
    body = {"model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 8, "seed": 11,
            "ignore_eos": True} | extra
    return httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]


def test_generation_defaults_apply_only_when_the_request_omits_them(tiny_model):
    with live_server(settings_for(tiny_model)) as auto, live_server(
            settings_for(tiny_model, generation_config="vllm")) as plain:
        # auto: an omitted temperature/top_p is the model's 0.6/0.95, the same draw as asking for them
        assert _sampled_text(auto.url, {}) == _sampled_text(auto.url, {"temperature": 0.6, "top_p": 0.95})
        # an explicit null is a field left out: the model's defaults again, not the API's
        assert _sampled_text(auto.url, {"temperature": None, "top_p": None}) == _sampled_text(auto.url, {})
        # vllm: the API defaults (1.0/1.0), and an explicit value always wins over the model's
        assert _sampled_text(plain.url, {}) == _sampled_text(auto.url, {"temperature": 1.0, "top_p": 1.0})
        assert _sampled_text(auto.url, {}) != _sampled_text(plain.url, {})


def test_chat_template_setting_replaces_the_models_templates(tiny_model, tmp_path):
    template = tmp_path / "plain.jinja"  # vLLM's --chat-template: a file (or the template text itself)
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    with live_server(settings_for(tiny_model, chat_template=str(template))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        for extra in ({}, {"tools": tools}):  # with tools too: the given template serves every conversation
            r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2, **extra)
            expected = Tokenizer(tiny_model).encode("[user] Hi\n[assistant] ", add_special_tokens=False)
            assert r.usage.prompt_tokens == len(expected), extra


@pytest.mark.parametrize(("value", "message"), [
    ("/nowhere/template.jinja", "is neither a readable file nor a Jinja template"),
    ("{% for m in messages %}{{ m['content'] }}", "chat_template\n  Value error, not a valid Jinja template"),
])
def test_bad_chat_template_is_refused_naming_the_setting(tiny_model, value, message):
    with pytest.raises(ValueError, match="chat_template") as info:
        settings_for(tiny_model, chat_template=value)
    assert message in str(info.value)
