"""Tool calls in model output, per model family, and OpenAI's `tool_calls` built from them.

The format is chosen from the model's chat template (the template that teaches the model the format is the best
witness of it): DeepSeek-V3/R1's `<｜tool▁calls▁begin｜>` tokens, or Qwen2.5/Hermes' `<tool_call>{json}</tool_call>`.
`ToolCallStream` is incremental like the reasoning parser: text before the first call streams as content, a
partial start marker is held back, and everything from the marker on is parsed when the output ends (each call
is then sent whole, as one `tool_calls` delta: OpenAI's shape, which clients accumulate the same way).

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


class HermesFormat:
    """Qwen2.5 / Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated."""

    name = "hermes"
    start = "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

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
        return "", calls


class ForcedCallStream:
    """tool_choice "required" / named: the grammar made the whole output a call; nothing streams as content."""

    def __init__(self, named: str | None) -> None:
        self._named = named
        self._text: list[str] = []

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
            return "", [ParsedCall(self._named, json.dumps(value, ensure_ascii=False))]
        return "", [ParsedCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in value]


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
