"""Streaming text out of generated tokens, and stop strings.

`IncrementalDetokenizer` decodes only a small window of tokens per step (vLLM's prefix/read offsets): the text of
window [prefix, read) was already emitted, so the new text is decode([prefix, end)) minus decode([prefix, read)).
Decoding from a few tokens back keeps tokenizer context (e.g. leading-space handling) right. Byte-level BPE can
split one UTF-8 character over several tokens; such a tail decodes to U+FFFD, so nothing is emitted until it
completes.

`StopChecker` finds stop strings in the cumulative text and holds back any tail that could still become one,
so a streamed partial stop string is never sent.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
PREFIX_WINDOW = 5  # prompt tokens decoded as context for the first output tokens (as vLLM)


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: _Decoder, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(len(self._ids) - PREFIX_WINDOW, 0)
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return "".join(self._chunks)

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text that became stable (often "", e.g. mid-character)."""
        self._ids.append(token_id)
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """At the end of generation: emit what is still held back (an incomplete character decodes to U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text, new_text = self._window_texts()
        return self._emit(new_text[len(prefix_text) :])

    def _window_texts(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip_special)
        new_text = decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip_special)
        return prefix_text, new_text

    def _emit(self, delta: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._chunks.append(delta)
        return delta


class StopChecker:
    def __init__(self, stop: list[str] | None):
        self.stop = [s for s in (stop or []) if s]
        self._longest = max(map(len, self.stop), default=0)
        self._searched_to = 0  # text before this index (minus a stop's length) holds no stop string
        self.matched: str | None = None  # the stop string that ended the text (OpenAI's stop_reason)

    def check(self, text: str, finished: bool = False) -> tuple[bool, str]:
        """Given the cumulative output text, return (stopped, text safe to emit so far).

        On a stop the text is cut before the earliest stop string. Otherwise, while streaming, the longest tail
        that is a prefix of some stop string (at most len(longest stop) - 1 characters) is held back; once
        `finished`, everything is released.
        """
        if not self.stop:
            return False, text
        start = max(self._searched_to - self._longest + 1, 0)
        hits = [(i, s) for i, s in ((text.find(s, start), s) for s in self.stop) if i >= 0]
        if hits:
            position, self.matched = min(hits, key=lambda hit: hit[0])
            return True, text[:position]
        self._searched_to = len(text)
        if finished:
            return False, text
        return False, text[: len(text) - self._partial_stop_len(text)]

    def _partial_stop_len(self, text: str) -> int:
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
