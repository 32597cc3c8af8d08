"""Engine outputs -> OpenAI bodies. A `ChoiceCursor` turns one choice's cumulative outputs into deltas (text,
reasoning split, logprobs); the non-streaming answer feeds the whole output through the same cursor, so both
forms are built by one code path and agree."""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json

from deepfleet.server import protocol as p
from deepfleet.server.reasoning import ReasoningParser
from deepfleet.server.tool_calls import call_id


class TokenText:
    """Token id -> its text, as OpenAI logprobs show it (cached: the same ids recur)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


class ChoiceCursor:
    """Position of what was already sent for one choice."""

    def __init__(self, reasoning: ReasoningParser | None, tools: Any = None, calls_finish: bool = True) -> None:
        """`tools`: a tool_calls.ToolCallStream / ForcedCallStream taking the content (None: no tool calls);
        `calls_finish`: finish_reason "tool_calls" when calls were made (OpenAI: not for a named tool_choice)."""
        self._reasoning = reasoning
        self._tools = tools
        self._calls_finish = calls_finish
        self.sent_chars = 0
        self.sent_logprobs = 0
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.tool_calls: list[Any] = []  # parsed calls, set when the output ends
        self._announced: list[list] = []  # streamed calls: [id, name, argument pieces sent]
        self.call_deltas: list[p.DeltaToolCall] = []  # the tool_calls deltas of the last advance (streaming)

    @property
    def saw_reasoning(self) -> bool:
        return self._reasoning is not None and self._reasoning.saw_reasoning

    def advance(self, completion: Any) -> tuple[str, str, list[dict[str, Any]]]:
        """New (reasoning, content, logprob entries) since the last call; on the final output the parser's
        held-back tail is flushed and finish_reason is set."""
        # the new text only (not a copy of all of it per step), up to the length read once: the engine process's
        # reader thread may extend this output meanwhile, and text past a second read would be skipped, not sent
        end = completion.text_len
        text = completion.text_since(self.sent_chars, end)
        self.sent_chars = end
        self.num_tokens = len(completion.token_ids)
        logprobs = (completion.logprobs or [])[self.sent_logprobs :]
        self.sent_logprobs += len(logprobs)
        if self._reasoning is None:
            reasoning, content = "", text
        else:
            reasoning, content = self._reasoning.feed(text)
        self.call_deltas = []
        if self._tools is not None:
            content = self._tools.feed(content)
        if completion.finish_reason is not None:
            self.finish_reason = completion.finish_reason
            if self._reasoning is not None:
                r, c = self._reasoning.finish()
                reasoning = reasoning + r
                content = content + (c if self._tools is None else self._tools.feed(c))
            if self._tools is not None:
                tail, self.tool_calls = self._tools.finish()
                content += tail
                if self.tool_calls and self._calls_finish and self.finish_reason == "stop":
                    self.finish_reason = "tool_calls"
                self._tools.take_deltas()  # the final calls below say all that is left to send
                self._stream_final_calls()
        elif self._tools is not None:
            for k, name, piece in self._tools.take_deltas():
                self._stream_call(k, name, piece)
        return reasoning, content, logprobs

    def _stream_call(self, k: int, name: str, piece: str) -> None:
        """OpenAI's deltas: a new call's id, type and name with empty arguments, then pieces of its arguments."""
        if k == len(self._announced):
            self._announced.append([call_id(), name, []])
            self.call_deltas.append(p.DeltaToolCall(index=k, id=self._announced[k][0], type="function",
                                                    function=p.ResponseFunctionCall(name=name, arguments="")))
        if piece and self._announced[k][1] == name:
            self._announced[k][2].append(piece)
            self.call_deltas.append(p.DeltaToolCall(index=k, function=p.ResponseFunctionCall(arguments=piece)))

    def _stream_final_calls(self) -> None:
        """What the parsed calls add to what was streamed, also when one step brought whole calls (a client that
        fell behind); a streamed call whose parsed arguments are not a continuation gets no more pieces."""
        for k, call in enumerate(self.tool_calls):
            if k == len(self._announced):
                self._stream_call(k, call.name, "")
            sent = "".join(self._announced[k][2])
            if self._announced[k][1] == call.name and call.arguments.startswith(sent):
                self._stream_call(k, call.name, call.arguments[len(sent):])


def tool_calls(calls: list[Any], ids: list[str]) -> list[p.ResponseToolCall] | None:
    if not calls:
        return None
    return [p.ResponseToolCall(id=i, function=p.ResponseFunctionCall(name=c.name, arguments=c.arguments))
            for c, i in zip(calls, ids, strict=True)]


# Logprobs are built as plain dicts and lists (the streamed chunks serialize them as they are; the non-streamed
# answers' models validate them): a chunk per stream per step, and a pydantic model per token there cost more than
# the rest of the event.


def chat_logprobs(entries: list[dict[str, Any]], token_text: TokenText) -> dict[str, Any]:
    """OpenAI's ChatLogprobs."""
    content = []
    for e in entries:
        token = token_text(e["token_id"])
        tops = [{"token": (t := token_text(tid)), "logprob": lp, "bytes": list(t.encode())}
                for tid, lp in (e.get("top_logprobs") or {}).items()]
        content.append({"token": token, "logprob": e["logprob"], "bytes": list(token.encode()), "top_logprobs": tops})
    return {"content": content}


def _logprobs() -> dict[str, list]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def completion_logprobs(entries: list[dict[str, Any]], token_text: TokenText, offset: int,
                        out: dict[str, list] | None = None) -> dict[str, list]:
    """OpenAI's CompletionLogprobs of output tokens, text offsets from `offset` on; appended to `out` (the echoed
    prompt's) if given."""
    out = _logprobs() if out is None else out
    tokens, token_logprobs, top_logprobs, text_offset = (out["tokens"], out["token_logprobs"], out["top_logprobs"],
                                                         out["text_offset"])
    for e in entries:
        token = token_text(e["token_id"])
        tokens.append(token)
        token_logprobs.append(e["logprob"])
        tops = e.get("top_logprobs")
        top_logprobs.append({token_text(tid): lp for tid, lp in tops.items()} if tops else {})
        text_offset.append(offset)
        offset += len(token)
    return out


def _top(entry: dict[str, Any], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of a prompt entry (the engine scores the prompt once, with the largest k any
    field of the request asked for; its top_logprobs are in rank order)."""
    return list(itertools.islice((entry.get("top_logprobs") or {}).items(), k))


def echo_logprobs(prompt_ids: list[int], entries: list[dict[str, Any] | None], token_text: TokenText,
                  k: int) -> dict[str, list]:
    """OpenAI's `echo` with `logprobs`: the prompt's tokens lead the choice's logprobs, the first one without a
    logprob (nothing precedes it); their text offsets add up the tokens' texts from 0, as vLLM's."""
    out, offset = _logprobs(), 0
    for token_id, e in zip(prompt_ids, entries, strict=True):
        token = token_text(token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(None if e is None else e["logprob"])
        out["top_logprobs"].append(None if e is None else {token_text(tid): lp for tid, lp in _top(e, k)})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def prompt_logprobs(entries: list[dict[str, Any] | None], token_text: TokenText, k: int) -> p.PromptLogprobs:
    """The engine's per-prompt-token entries in vLLM's shape: the prompt token with its rank, plus the top k
    (ranks 1..k in order)."""
    out: p.PromptLogprobs = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranked = {tid: p.PromptLogprob(logprob=lp, rank=r, decoded_token=token_text(tid))
                  for r, (tid, lp) in enumerate(_top(e, k), start=1)}
        ranked.setdefault(e["token_id"], p.PromptLogprob(logprob=e["logprob"], rank=e["rank"],
                                                         decoded_token=token_text(e["token_id"])))
        out.append({str(tid): v for tid, v in ranked.items()})
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> p.Usage:
    return p.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens),
    )


# Bytes str.splitlines() breaks lines at that JSON may carry raw inside strings (the others, \n \r \v \f
# \x1c-\x1e, are control characters JSON always escapes): U+0085, U+2028 and U+2029 in UTF-8. Clients that split an
# SSE stream that way (httpx's aiter_lines) would cut an event in two, so they are written as JSON escapes: the same
# string, one line.
_LINE_SEPARATORS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def sse(chunk: dict[str, Any] | BaseModel) -> bytes:
    """One SSE event carrying `chunk` as JSON on a single line whatever line splitting the client uses. Streamed
    chunks are plain dicts (their None fields left out by whoever builds them) serialized as they are: building and
    validating a model per chunk cost more than the rest of the event. Models nested in them, or given whole, leave
    their null fields out: OpenAI clients read absent and null alike. Non-finite floats become null, as pydantic's
    own JSON has them."""
    data = to_json(chunk, exclude_none=True, inf_nan_mode="null")
    if b"\xc2\x85" in data or b"\xe2\x80" in data:
        for raw, escaped in _LINE_SEPARATORS:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
