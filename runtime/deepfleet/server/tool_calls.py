"""Tool calls in model output, per model family, and OpenAI's `tool_calls` built from them.

The format is chosen from the model's chat template (the template that teaches the model the format is the best
witness of it): DeepSeek-V3/R1's `<｜tool▁calls▁begin｜>` tokens, or Qwen2.5/Hermes' `<tool_call>{json}</tool_call>`.
`ToolCallStream` is incremental like the reasoning parser: text before the first call streams as content, a
partial start marker is held back, and from the marker on `progress()` gives each call whose name is complete
with its arguments' raw JSON text so far, so the stream sends OpenAI's deltas: the call's id and name first, then
argument pieces as they are written. When the output ends the whole text is parsed; the arguments keep their
raw text (what was streamed) when it is the parsed value. A call announced in the stream whose text then turns
out not to parse stays announced (its text also ends up as content), which a model writing a call's head and
then something else would show.

`tool_choice` "required" or a named function are enforced with structured output instead (the grammar makes the
model write exactly a call), so they work with any model, as vLLM does."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from deepfleet.server.reasoning import _held_suffix


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_NAME = r'"((?:[^"\\]|\\.)*)"'  # a JSON string's body


def value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array that starts at text[start], None while it is still open."""
    depth, in_string, escaped = 0, False, False
    for j in range(start, len(text)):
        ch = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _named_heads(pattern: re.Pattern, text: str) -> list[tuple[str, int]]:
    """(name, where its arguments start) for each call head `pattern` finds, the name a JSON string body."""
    return [(json.loads(f'"{m.group(1)}"'), m.end()) for m in pattern.finditer(text)]


def _arguments_so_far(text: str, heads: list[tuple[str, int]]) -> list[tuple[str, str]]:
    return [(name, text[at : value_end(text, at) or len(text)]) for name, at in heads]


def _keep_raw(calls: list[ParsedCall], progress: list[tuple[str, str]]) -> list[ParsedCall]:
    """The parsed calls with the arguments' raw text where it is the same value (what the stream sent)."""
    for call, (name, raw) in zip(calls, progress, strict=False):
        try:
            same = name == call.name and json.loads(raw) == json.loads(call.arguments)
        except json.JSONDecodeError:
            same = False
        if same:
            call.arguments = raw
    return calls


class HermesFormat:
    """Qwen2.5 / Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated."""

    name = "hermes"
    start = "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
    _head = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"arguments"\s*:\s*(?=[{\[])')

    def heads(self, text: str) -> list[tuple[str, int]]:
        return _named_heads(self._head, text)

    def parse(self, text: str) -> list[ParsedCall] | None:
        calls = []
        for body in self._call.findall(text):
            try:
                obj = json.loads(body)
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            calls.append(ParsedCall(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)))
        return calls or None


class DeepSeekV3Format:
    """DeepSeek-V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```
    <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`; V3.1 writes `NAME<｜tool▁sep｜>ARGS` without the type and fence."""

    name = "deepseek_v3"
    start = "<｜tool▁calls▁begin｜>"
    _call = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)(?:<｜tool▁call▁end｜>|$)", re.S)
    _fenced = re.compile(r"^(.*?)\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)
    _head = re.compile(r"<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>([^\n<]+)\n```(?:json)?\s*|"
                       r"((?:(?!<｜)[^\n])+?)<｜tool▁sep｜>\s*)(?=[{\[])")

    def heads(self, text: str) -> list[tuple[str, int]]:
        return [((m.group(1) or m.group(2)).strip(), m.end()) for m in self._head.finditer(text)]

    def parse(self, text: str) -> list[ParsedCall] | None:
        calls = []
        for head, rest in self._call.findall(text):
            fenced = self._fenced.match(rest)
            name, args = (fenced.group(1), fenced.group(2)) if fenced else (head, rest)
            if fenced is None and head.strip() == "function":  # V3 type tag, no fence: not a call we understand
                return None
            try:
                arguments = json.loads(args)
            except json.JSONDecodeError:
                return None
            calls.append(ParsedCall(name.strip(), json.dumps(arguments, ensure_ascii=False)))
        return calls or None


FORMATS = {f.name: f for f in (DeepSeekV3Format(), HermesFormat())}


def format_for_templates(templates: dict[str, str]) -> Any:
    """The tool-call format a model was taught, from its chat templates; None when none is recognised."""
    text = "\n".join(templates.values())
    for fmt in FORMATS.values():
        if fmt.start in text:
            return fmt
    return None


class ToolCallStream:
    """feed() content deltas, get the content to send now; finish() gives (content held back, parsed calls)."""

    def __init__(self, fmt: Any) -> None:
        self._fmt = fmt
        self._held = ""
        self._calls_text: str | None = None  # from the start marker on

    def feed(self, text: str) -> str:
        if self._calls_text is not None:
            self._calls_text += text
            return ""
        text = self._held + text
        at = text.find(self._fmt.start)
        if at >= 0:
            self._held, self._calls_text = "", text[at:]
            return text[:at]
        keep = _held_suffix(text, self._fmt.start)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[ParsedCall]]:
        held, self._held = self._held, ""
        if self._calls_text is None:
            return held, []
        calls = self._fmt.parse(self._calls_text)
        if calls is None:  # not a call after all (or cut short): the text is the answer
            return self._calls_text, []
        return "", _keep_raw(calls, self.progress())

    def progress(self) -> list[tuple[str, str]]:
        """(name, arguments' raw text so far) of each call whose name is complete."""
        if self._calls_text is None:
            return []
        return _arguments_so_far(self._calls_text, self._fmt.heads(self._calls_text))


class ForcedCallStream:
    """tool_choice "required" / named: the grammar made the whole output a call; nothing streams as content."""

    _head = re.compile(r'\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"parameters"\s*:\s*(?=[{\[])')

    def __init__(self, named: str | None) -> None:
        self._named = named
        self._text: list[str] = []

    def progress(self) -> list[tuple[str, str]]:
        """(name, arguments so far): the named function's are the whole output; required's are in its list."""
        text = "".join(self._text)
        if self._named is not None:
            return [(self._named, text)] if text else []
        return _arguments_so_far(text, _named_heads(self._head, text))

    def feed(self, text: str) -> str:
        self._text.append(text)
        return ""

    def finish(self) -> tuple[str, list[ParsedCall]]:
        text = "".join(self._text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:  # cut short by max_tokens: hand back what was written
            return text, []
        if self._named is not None:
            calls = [ParsedCall(self._named, json.dumps(value, ensure_ascii=False))]
        else:
            calls = [ParsedCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]
        return "", _keep_raw(calls, self.progress())


def forced_call_schema(tools: list[Any], named: str | None, parallel: bool) -> dict[str, Any]:
    """The JSON schema a forced call must follow: the named function's parameters, or (required) a list of
    {"name", "parameters"} objects, one of the tools each (vLLM's form)."""

    def params(tool: Any) -> dict[str, Any]:
        return tool.function.parameters or {"type": "object"}

    if named is not None:
        return params(next(t for t in tools if t.function.name == named))
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": params(t)},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in tools]}
    schema: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema
