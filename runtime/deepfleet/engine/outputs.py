"""What the engine reports: per-request outputs (cumulative) and engine-wide stats. Plain data without torch, so
the server process can receive them from the engine process without loading torch itself."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from deepfleet.engine.spec_decode.metrics import SpecDecodeStats


class TextSoFar:
    """A request's output text, append-only, kept as chunks: `s += piece` on one growing string copies the whole
    text (O(output length) per token: ~38 µs at 100k characters on the dev machine, R1 answers get there), so the
    text is joined only when someone reads all of it, and `since` returns what came after a position by copying
    only that."""

    __slots__ = ("_chunks", "_ends", "_len", "_joined")

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._ends: list[int] = []  # each chunk's end offset in the text
        self._len = 0
        self._joined = ""  # the text of the first chunks, joined at the last full read

    def __len__(self) -> int:
        return self._len

    def append(self, piece: str) -> None:
        if piece:  # (in this order: a reader in another thread never sees a length its chunks do not hold yet)
            self._chunks.append(piece)
            self._ends.append(self._len + len(piece))
            self._len += len(piece)

    def upto(self, end: int) -> str:
        """The first `end` characters."""
        if len(self._joined) < end:
            self._joined = "".join(self._chunks)
        return self._joined[:end] if end < len(self._joined) else self._joined

    def since(self, start: int, end: int) -> str:
        """Characters start..end; costs their length (plus a bisection), not the text's."""
        if start >= end:
            return ""
        if end == self._len and start == end - len(self._chunks[-1]):  # a reader one step behind: the last piece
            return self._chunks[-1]
        i = bisect_right(self._ends, start)
        first = start - (self._ends[i - 1] if i else 0)
        j = bisect_right(self._ends, end - 1, lo=i)  # the chunk holding the last character
        return "".join(self._chunks[i : j + 1])[first : first + end - start]


class CompletionOutput:
    """`text` is a str, or the request's TextSoFar read at its length when this output was built (the engine's:
    building one per step then costs nothing per character). `text_since(n)` is the text after its first n
    characters, without joining all of it."""

    __slots__ = ("index", "_text", "_text_len", "token_ids", "finish_reason", "logprobs", "stop_reason")

    def __init__(self, index: int, text: str | TextSoFar, token_ids: list[int], finish_reason: str | None,
                 logprobs: list[dict] | None = None, stop_reason: str | int | None = None):
        self.index = index
        self._text, self._text_len = text, len(text)  # (the setter's work, without its call: built every step)
        self.token_ids = token_ids
        self.finish_reason = finish_reason  # "stop" | "length" | "abort" | "timeout"
        self.logprobs = logprobs  # per token: {"token_id", "logprob", "top_logprobs": {id: lp}}
        self.stop_reason = stop_reason

    @property
    def text(self) -> str:
        if isinstance(self._text, str):
            return self._text
        return self._text.upto(self._text_len)

    @text.setter
    def text(self, value: str | TextSoFar) -> None:
        self._text, self._text_len = value, len(value)

    def text_since(self, start: int, end: int | None = None) -> str:
        """Characters start..end (end: this output's length). A reader of an output that a receiver thread extends
        (`extend_text`) reads `text_len` once and passes it as `end`, so what it takes and where it resumes agree."""
        end = self._text_len if end is None else end
        if isinstance(self._text, str):
            return self._text[start:end]
        return self._text.since(start, end)

    def extend_text(self, piece: str) -> None:
        """Append to this output's own text (a receiver rebuilding cumulative outputs from deltas). The length is
        set last and a str text is replaced only by a TextSoFar that already holds it: a reader in another thread
        sees the old text or the new one, never less."""
        if isinstance(self._text, str):
            text = TextSoFar()
            text.append(self._text)
            self._text = text
        self._text.append(piece)
        self._text_len = len(self._text)

    @property
    def text_len(self) -> int:
        return self._text_len

    def _fields(self) -> tuple:
        return (self.index, self.text, self.token_ids, self.finish_reason, self.logprobs, self.stop_reason)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompletionOutput) and self._fields() == other._fields()

    __hash__ = None  # mutable, as the dataclass it replaces

    def __repr__(self) -> str:
        return "CompletionOutput(index={!r}, text={!r}, token_ids={!r}, finish_reason={!r}, logprobs={!r}, " \
            "stop_reason={!r})".format(*self._fields())

    def __reduce__(self):  # pickled (to another process) as its text at this point
        return CompletionOutput, self._fields()


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # with prompt_logprobs: per prompt token (None for the first), {"token_id", "logprob", "rank", "top_logprobs"}
    prompt_logprobs: list[dict | None] | None = None


@dataclass(frozen=True)
class LoRAStats:
    """LoRA on: the adapter slots and which adapters unfinished requests use (names sorted)."""

    max_loras: int
    running: tuple[str, ...]  # adapters of running requests
    waiting: tuple[str, ...]  # adapters of waiting (and preempted) requests


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int  # cumulative tokens
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_decode: SpecDecodeStats | None = None  # engine.speculative set: acceptance counters
    lora: LoRAStats | None = None  # LoRA on
