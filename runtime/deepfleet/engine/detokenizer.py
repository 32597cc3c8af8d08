"""Streaming text out of generated tokens, and stop strings; per-token cost independent of the output's length.

`IncrementalDetokenizer` feeds each token to `tokenizers`' `DecodeStream` (Rust: it keeps its own prefix/read
offsets, primed with the last prompt tokens so leading-space handling is right). Byte-level BPE can split one
UTF-8 character over several tokens; the stream returns nothing until the character completes. At the end,
`flush` decodes what is still held back (an incomplete character becomes U+FFFD, as a full decode gives).
The stream re-decodes every token it holds back at each step, so a run of tokens that add no text costs more per
token the longer it gets. Ids outside the tokenizer's vocabulary (a model's vocab_size often exceeds the
tokenizer's: padding rows) decode to nothing in a full decode too, so they are not fed to the stream at all (dev
machine: a step took 1.4 µs with no such id held, 11.6 µs with 300 held).
A request whose text nobody reads before it ends (not streamed, no stop strings) skips all that: `decode_outputs`
decodes its whole output once, after the same prompt context: the same text as the stream's (broken UTF-8 and
ids past the vocabulary included), except after a token-id prompt that ends inside a character.

`StopChecker` looks for stop strings in the new text plus the short tail it held back, and holds back any tail
that could still become one, so a streamed partial stop string is never sent and no step rescans the whole text.
"""

from __future__ import annotations

from typing import Any, Protocol

from tokenizers.decoders import DecodeStream

PREFIX_WINDOW = 5  # prompt tokens decoded as context for the first output tokens (as vLLM)


class _Tokenizer(Protocol):
    backend: Any  # the `tokenizers.Tokenizer` that DecodeStream steps with

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: _Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._skip_special = skip_special_tokens
        context = list(prompt_token_ids[-PREFIX_WINDOW:])
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)  # ids at or past it: checked
        self._context = context  # the last few tokens before the held-back ones (for flush)
        self._held: list[int] = []  # tokens the stream has not turned into text yet
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far (joined on demand: not for the per-step path)."""
        return "".join(self._chunks)

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text that became stable (often "", e.g. mid-character)."""
        if token_id >= self._vocab_size and self._backend.id_to_token(token_id) is None:
            return ""  # not in the vocabulary: no text, now or with later tokens
        delta = self._stream.step(self._backend, token_id)
        held = self._held
        held.append(token_id)
        if not delta:
            return ""
        context = self._context  # (in place: a list built per token would cost more than the decode step)
        context.extend(held)
        if len(context) > PREFIX_WINDOW:
            del context[: len(context) - PREFIX_WINDOW]
        held.clear()
        self._chunks.append(delta)
        return delta

    def known(self, token_ids: list[int]) -> list[int]:
        """token_ids without the ids past the tokenizer's vocabulary (they decode to nothing)."""
        if token_ids and max(token_ids) >= self._vocab_size:
            return [t for t in token_ids if t < self._vocab_size or self._backend.id_to_token(t) is not None]
        return token_ids

    def flush(self) -> str:
        """At the end of generation: emit what is still held back (an incomplete character decodes to U+FFFD)."""
        if not self._held:
            return ""
        decode = self._tokenizer.decode
        before = decode(self._context, skip_special_tokens=self._skip_special)
        delta = decode(self._context + self._held, skip_special_tokens=self._skip_special)[len(before):]
        self._context, self._held = (self._context + self._held)[-PREFIX_WINDOW:], []
        if delta:
            self._chunks.append(delta)
        return delta


def decode_outputs(detokenizers: list[IncrementalDetokenizer], outputs: list[list[int]]) -> list[str]:
    """The text of each whole output at once, after its detokenizer's prompt context (detokenizers never appended
    to): two `decode_batch` calls per skip_special_tokens setting, which the tokenizer spreads over its threads."""
    texts = [""] * len(outputs)
    for skip in (True, False):
        rows = [i for i, d in enumerate(detokenizers) if d._skip_special is skip]
        if not rows:
            continue
        backend = detokenizers[rows[0]]._backend
        contexts = [detokenizers[i]._context for i in rows]
        before = backend.decode_batch(contexts, skip_special_tokens=skip)
        whole = backend.decode_batch([c + detokenizers[i].known(outputs[i]) for c, i in zip(contexts, rows,
                                                                                              strict=True)],
                                     skip_special_tokens=skip)
        for i, b, w in zip(rows, before, whole, strict=True):
            texts[i] = w[len(b):]
    return texts


class StopChecker:
    def __init__(self, stop: list[str] | None):
        self.stop = [s for s in (stop or []) if s]
        self._longest = max(map(len, self.stop), default=0)
        # every proper prefix of a stop string, and the characters they end with: a tail that could still become a
        # stop string is one of these, so a text not ending in one of those characters holds nothing back
        self._prefixes = {s[:n] for s in self.stop for n in range(1, len(s))}
        self._prefix_ends = {p[-1] for p in self._prefixes}
        self._held = ""  # released text's tail that is a prefix of some stop string (< longest characters)
        self.matched: str | None = None  # the stop string that ended the text (OpenAI's stop_reason)

    def feed(self, delta: str, finished: bool = False, armed: bool = True) -> tuple[bool, str]:
        """Given the new output text, return (stopped, text now safe to emit). While not `armed` (fewer than
        min_tokens generated, as vLLM) no stop string ends the text; the tail is still held back, so a stop string
        completed by the first armed token is found (vLLM searches the new text plus a stop string's length back).

        On a stop the text is cut before the earliest stop string. Otherwise, while streaming, the longest tail
        that is a prefix of some stop string is held back (at most len(longest stop) - 1 characters); once
        `finished`, everything is released. Any stop string that ends in `delta` starts within the held tail or
        `delta` (the held tail is the longest suffix that could begin one), so nothing older is searched.
        """
        if not self.stop:
            return False, delta
        window = self._held + delta
        if armed:
            position = -1
            for s in self.stop:  # the earliest stop string in the window
                i = window.find(s)
                if i >= 0 and (position < 0 or i < position):
                    position, self.matched = i, s
            if position >= 0:
                self._held = ""
                return True, window[:position]
        keep = 0 if finished else self._partial_stop_len(window)
        self._held = window[len(window) - keep:] if keep else ""
        return False, window[: len(window) - keep]

    def _partial_stop_len(self, text: str) -> int:
        if not text or text[-1] not in self._prefix_ends:
            return 0
        prefixes = self._prefixes
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            if text[-n:] in prefixes:
                return n
        return 0
