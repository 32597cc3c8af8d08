"""Tool calls in model output, per model family, and OpenAI's `tool_calls` built from them.

The format is chosen from the model's chat template (the template that teaches the model the format is the best
witness of it): DeepSeek-V3/R1's `<｜tool▁calls▁begin｜>` tokens, or Qwen2.5/Hermes' `<tool_call>{json}</tool_call>`.
`ToolCallStream` is incremental like the reasoning parser: text before the first call streams as content, a
partial start marker is held back, and from the marker on `take_deltas()` gives what the calls gained since it was
last asked (a call whose name is complete, then pieces of its arguments' raw JSON text), so the stream sends
OpenAI's deltas: the call's id and name first, then argument pieces as they are written. Each piece of output is
scanned once (`_CallsSoFar`): a step costs what it added, not the text before it. When the output ends the
whole text is parsed; the arguments keep their raw text (what was streamed) when it is the parsed value. A call
announced in the stream whose text then turns out not to parse stays announced (its text also ends up as
content), which a model writing a call's head and then something else would show.

`tool_choice` "required" or a named function are enforced with structured output instead (the grammar makes the
model write exactly a call), so they work with any model, as vLLM does."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
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


def _first_named_head(pattern: re.Pattern, text: str) -> tuple[str, int] | None:
    """(name, where its arguments start) of the first call head `pattern` finds, the name a JSON string body."""
    m = pattern.search(text)
    return None if m is None else (json.loads(f'"{m.group(1)}"'), m.end())


class _CallsSoFar:
    """The calls in a text that grows piece by piece. The next call's head is looked for only in the text after the
    last call's arguments, and an open call's arguments (a JSON object or array) are followed as they arrive, by
    nesting depth, strings and escapes, so feeding a piece costs what the piece adds: R1-style outputs write
    arguments of many kilobytes, and re-reading them every step made a stream quadratic in its length."""

    def __init__(self, find_head: Callable[[str], tuple[str, int] | None]) -> None:
        self._find_head = find_head  # (name, where the arguments start) of the first head in a text, or None
        self._between = ""  # text after the last call's arguments (the next head starts in it)
        self.names: list[str] = []
        self.arguments: list[list[str]] = []  # each call's argument pieces
        self._open = False
        self._depth, self._in_string, self._escaped = 0, False, False

    def feed(self, text: str) -> list[tuple[int, str, str]]:
        """(call index, name, argument piece) for what `text` added; a new call comes first with an empty piece."""
        deltas: list[tuple[int, str, str]] = []
        while text:
            if not self._open:
                self._between += text
                head = self._find_head(self._between)
                if head is None:
                    break
                name, at = head
                text, self._between = self._between[at:], ""
                self.names.append(name)
                self.arguments.append([])
                self._open, self._depth, self._in_string, self._escaped = True, 0, False, False
                deltas.append((len(self.names) - 1, name, ""))
            end = self._arguments_end(text)
            piece = text if end is None else text[:end]
            if piece:
                self.arguments[-1].append(piece)
                deltas.append((len(self.names) - 1, self.names[-1], piece))
            if end is None:
                break
            self._open, text = False, text[end:]
        return deltas

    def _arguments_end(self, text: str) -> int | None:
        """Index in `text` just past the open call's arguments, None while they stay open (the scan state kept)."""
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        for j, ch in enumerate(text):
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
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        return None

    def so_far(self) -> list[tuple[str, str]]:
        """(name, arguments' raw text so far) of each call seen (joined once, at the end of the output)."""
        return [(name, "".join(pieces)) for name, pieces in zip(self.names, self.arguments, strict=True)]


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

    def first_head(self, text: str) -> tuple[str, int] | None:
        return _first_named_head(self._head, text)

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

    def first_head(self, text: str) -> tuple[str, int] | None:
        m = self._head.search(text)
        return None if m is None else ((m.group(1) or m.group(2)).strip(), m.end())

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
    """feed() content deltas, get the content to send now; take_deltas() what the calls gained; finish() gives
    (content held back, parsed calls)."""

    def __init__(self, fmt: Any) -> None:
        self._fmt = fmt
        self._held = ""
        self._calls_text: list[str] | None = None  # from the start marker on, as fed
        self._calls = _CallsSoFar(fmt.first_head)
        self._deltas: list[tuple[int, str, str]] = []

    def feed(self, text: str) -> str:
        if self._calls_text is not None:
            self._calls_text.append(text)
            self._deltas += self._calls.feed(text)
            return ""
        text = self._held + text
        at = text.find(self._fmt.start)
        if at >= 0:
            self._held, self._calls_text = "", [text[at:]]
            self._deltas += self._calls.feed(text[at:])
            return text[:at]
        keep = _held_suffix(text, self._fmt.start)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def take_deltas(self) -> list[tuple[int, str, str]]:
        """(call index, name, argument piece) gained since the last call; a new call first with an empty piece."""
        deltas, self._deltas = self._deltas, []
        return deltas

    def finish(self) -> tuple[str, list[ParsedCall]]:
        held, self._held = self._held, ""
        if self._calls_text is None:
            return held, []
        text = "".join(self._calls_text)
        calls = self._fmt.parse(text)
        if calls is None:  # not a call after all (or cut short): the text is the answer
            return text, []
        return "", _keep_raw(calls, self._calls.so_far())


class ForcedCallStream:
    """tool_choice "required" / named: the grammar made the whole output a call; nothing streams as content."""

    _head = re.compile(r'\{\s*"name"\s*:\s*' + _NAME + r'\s*,\s*"parameters"\s*:\s*(?=[{\[])')

    def __init__(self, named: str | None) -> None:
        self._named = named
        self._text: list[str] = []
        self._calls = _CallsSoFar(lambda text: _first_named_head(self._head, text))  # (required: a list of calls)
        self._deltas: list[tuple[int, str, str]] = []

    def feed(self, text: str) -> str:
        if self._named is None:
            self._deltas += self._calls.feed(text)
        elif text:  # the named function's arguments are the whole output
            self._deltas += [(0, self._named, "")] * (not self._text) + [(0, self._named, text)]
        if text:
            self._text.append(text)
        return ""

    def take_deltas(self) -> list[tuple[int, str, str]]:
        """(call index, name, argument piece) gained since the last call; a new call first with an empty piece."""
        deltas, self._deltas = self._deltas, []
        return deltas

    def finish(self) -> tuple[str, list[ParsedCall]]:
        text = "".join(self._text)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:  # cut short by max_tokens: hand back what was written
            return text, []
        if self._named is not None:
            calls = [ParsedCall(self._named, json.dumps(value, ensure_ascii=False))]
            return "", _keep_raw(calls, [(self._named, text)])
        calls = [ParsedCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]
        return "", _keep_raw(calls, self._calls.so_far())


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
