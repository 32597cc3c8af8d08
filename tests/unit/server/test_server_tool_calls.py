"""Tool calls in OpenAI's shape, with the official openai client against `deepfleet serve`'s app on loopback:
forced calls (tool_choice "required" / named) through the grammar on the real tiny model, streamed and not;
the model's own calls (tool_choice "auto") parsed in the DeepSeek-V3/R1 and Hermes/Qwen2.5 formats, chosen from
the model's chat template (a scripted engine writes the exact text); bad tool requests are 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from server_fakes import ScriptedEngine
from server_helpers import MODEL_NAME, live_server, settings_for

from deepfleet.engine.outputs import CompletionOutput
from deepfleet.server.render import ChoiceCursor
from deepfleet.server.tool_calls import (
    DeepSeekV3Format,
    ForcedCallStream,
    HermesFormat,
    ToolCallStream,
    format_for_templates,
)

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"enum": [1, 2, 3]}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


# ---- parsers ---------------------------------------------------------------------------------------------------

HERMES = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' \
         '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
DEEPSEEK = ("Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Oslo", "days": 1}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
DEEPSEEK_V31 = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"zone": "CET"}<｜tool▁call▁end｜>'
                "<｜tool▁calls▁end｜>")


def _stream(fmt, text: str, step: int) -> tuple[str, list]:
    s = ToolCallStream(fmt)
    content = "".join(s.feed(text[i : i + step]) for i in range(0, len(text), step))
    tail, calls = s.finish()
    return content + tail, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_parsers_split_content_and_calls_at_any_chunking(step):
    assert _stream(HermesFormat(), HERMES, step) == (
        "Let me look.", [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "UTC"})])
    assert _stream(DeepSeekV3Format(), DEEPSEEK, step) == ("Checking.", [("get_weather", {"city": "Oslo", "days": 1})])
    assert _stream(DeepSeekV3Format(), DEEPSEEK_V31, step) == ("", [("get_time", {"zone": "CET"})])
    # not a call after all: everything is content, nothing lost
    assert _stream(HermesFormat(), "a <tool_call> {broken", step) == ("a <tool_call> {broken", [])
    assert _stream(HermesFormat(), "x <tool_cal", step) == ("x <tool_cal", [])


FORCED_REQUIRED = ('[{"name":"get_weather","parameters":{"city":"Paris","days":2}},'
                   '{"name":"get_time","parameters":{"zone":"UTC"}}]')


@pytest.mark.parametrize("step", [1, 3, 1000])
@pytest.mark.parametrize(("stream", "text"), [
    (lambda: ToolCallStream(HermesFormat()), HERMES), (lambda: ToolCallStream(DeepSeekV3Format()), DEEPSEEK),
    (lambda: ToolCallStream(DeepSeekV3Format()), DEEPSEEK_V31), (lambda: ForcedCallStream(None), FORCED_REQUIRED),
    (lambda: ForcedCallStream("get_time"), '{"zone":"UTC"}')])
def test_streamed_call_deltas_accumulate_to_the_final_calls(stream, text, step):
    """OpenAI's streaming shape at any chunking: per call a first delta with id, type, name and empty arguments,
    then argument pieces (also when the whole call came in one step: step 1000); concatenated they are exactly
    the non-streamed calls' arguments."""
    cursor = ChoiceCursor(None, stream())
    deltas = []
    for end in [*range(step, len(text), step), len(text)]:
        cursor.advance(CompletionOutput(0, text[:end], [0] * end, None if end < len(text) else "stop"))
        deltas += cursor.call_deltas
    calls: dict[int, list] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id.startswith("call_") and d.type == "function" and d.function.name
            assert d.function.arguments == ""
            calls[d.index] = [d.function.name, ""]
        else:
            assert d.id is None and d.function.name is None
        calls[d.index][1] += d.function.arguments
    assert [tuple(v) for _, v in sorted(calls.items())] == [(c.name, c.arguments) for c in cursor.tool_calls]
    assert cursor.tool_calls and cursor.finish_reason == "tool_calls"
    assert len(deltas) >= 2 * len(calls)  # the announcement, then at least one piece of arguments
    if step == 1:
        assert len(deltas) > 2 * len(calls)  # pieces while written, not one delta per call at the end


TRICKY_ARGS = '{"code": "if (a) { b[\\"}\\"] = \'[\'; }", "list": [[1, {"x": "]"}], []], "s": "\\\\"}'


def test_tricky_arguments_close_where_the_json_does_at_any_chunking():
    """Braces and brackets inside strings, escaped quotes and a trailing escaped backslash do not end a call's
    arguments; the pieces streamed while it is open are exactly its raw text, and the next call is found after it."""
    assert json.loads(TRICKY_ARGS)["s"] == "\\"  # the expectation is valid JSON, written by hand
    text = (f'<tool_call>\n{{"name": "run", "arguments": {TRICKY_ARGS}}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')
    for step in (1, 2, 7, len(text)):
        s = ToolCallStream(HermesFormat())
        pieces: dict[int, list] = {}
        for i in range(0, len(text), step):
            assert s.feed(text[i : i + step]) == ""
            for k, name, piece in s.take_deltas():
                pieces.setdefault(k, [name, ""])[1] += piece
        assert pieces == {0: ["run", TRICKY_ARGS], 1: ["get_time", '{"zone": "UTC"}']}
        _, calls = s.finish()
        assert [(c.name, c.arguments) for c in calls] == [("run", TRICKY_ARGS), ("get_time", '{"zone": "UTC"}')]


def test_long_arguments_stream_piece_by_piece():
    """A 200 kB argument fed in 5-character pieces (40,000 steps): every step hands on exactly what it added."""
    body = '{"content": "' + "x = {[1]}; " * 18_000 + '"}'
    text = '<tool_call>\n{"name": "write", "arguments": ' + body + "}\n</tool_call>"
    s = ToolCallStream(HermesFormat())
    sent = []
    for i in range(0, len(text), 5):
        s.feed(text[i : i + 5])
        sent += [piece for _, _, piece in s.take_deltas()]
    assert "".join(sent) == body and max(len(piece) for piece in sent) <= 5
    assert [(c.name, c.arguments) for c in s.finish()[1]] == [("write", body)]


def test_format_is_chosen_from_the_chat_template():
    assert format_for_templates({"default": "{{ '<tool_call>' }}"}).name == "hermes"
    assert format_for_templates({"default": "x", "tool_use": "<｜tool▁calls▁begin｜>"}).name == "deepseek_v3"
    assert format_for_templates({"default": "plain"}) is None


# ---- forced calls on the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_choice_not_streamed(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=40, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's value for a named tool_choice
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls, {"get_weather"})
    assert len(choice.message.tool_calls) == 1


def test_required_tool_choice_streamed_accumulates_like_openai(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                            seed=2, tool_choice="required", parallel_tool_calls=False, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = d.id or slot["id"]
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] in SCHEMAS
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_required_not_streamed_and_tool_results_in_the_history(client):
    first = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=80, seed=3,
                                           tool_choice="required")
    assert first.choices[0].finish_reason == "tool_calls"
    _check_calls(first.choices[0].message.tool_calls, set(SCHEMAS))
    call = first.choices[0].message.tool_calls[0]
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    follow = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=5,
                                            tool_choice="none")
    assert follow.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
])
def test_bad_tool_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4} | body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


# ---- the model's own calls (auto), exact text from a scripted engine -------------------------------------------


@pytest.fixture(scope="module", params=[("hermes", HERMES), ("deepseek_v3", DEEPSEEK)], ids=["hermes", "deepseek"])
def scripted(request, tiny_model):
    name, script = request.param
    template = {"hermes": "{{ '<tool_call>' }}", "deepseek_v3": "{{ '<｜tool▁calls▁begin｜>' }}"}[name]
    engine = ScriptedEngine(script, {"default": template})
    engine.max_model_len = len(script) + 64  # room for the whole script after the prompt
    settings = settings_for(tiny_model, warmup_requests=0, engine_process=False, reasoning_parser="none")
    with live_server(settings, lambda _s: engine) as s:
        yield s, script


def test_auto_tool_calls_parsed_streamed_and_not(scripted):
    server, script = scripted
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    kw = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "?"}], "tools": TOOLS}
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == script.split("<")[0]
    _check_calls(choice.message.tool_calls, set(SCHEMAS))
    streamed_content, streamed, pieces = "", {}, 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed_content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.index not in streamed:  # the first delta of a call: id, type and name
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    streamed[d.index] = [d.function.name, ""]
                else:
                    assert d.id is None and d.function.name is None
                streamed[d.index][1] += d.function.arguments or ""
                pieces += 1
    assert streamed_content == choice.message.content
    assert [tuple(v) for _, v in sorted(streamed.items())] == [
        (t.function.name, t.function.arguments) for t in choice.message.tool_calls]
    assert pieces >= len(streamed)
    # tool_choice none: the same text is plain content
    plain = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert plain.message.content == script and plain.message.tool_calls is None and plain.finish_reason == "stop"
