"""DeepSeek-R1 reasoning split: the model writes `<think> ... </think>` before its answer; the API returns the
first part as `reasoning_content` and the rest as `content`.

R1's own chat templates (and the tiny test models') already end the prompt with `<think>\\n`, so the output
starts *inside* the reasoning and only `</think>` appears; other templates leave the model to open the tag.
The parser is incremental so streaming and non-streaming run the very same code and agree token for token.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_reasoning(prompt: str) -> bool:
    return prompt.rstrip().endswith(THINK_OPEN)


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """feed() text deltas, get (reasoning_delta, content_delta); finish() flushes what was held back."""

    def __init__(self, in_reasoning: bool) -> None:
        # start: output may open with <think>; reasoning: inside; lead: just after </think>, dropping the
        # blank lines R1 puts there; content: the answer.
        self._state = "reasoning" if in_reasoning else "start"
        self._held = ""
        self.saw_reasoning = in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        text = self._held + text
        self._held = ""
        if self._state == "start":
            stripped = text.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._state, self.saw_reasoning = "reasoning", True
                text = stripped[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(stripped):  # whitespace or a partial "<think": wait for more
                self._held = text
                return "", ""
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = text.find(THINK_CLOSE)
            if end < 0:
                keep = _held_suffix(text, THINK_CLOSE)
                self._held = text[len(text) - keep :] if keep else ""
                return text[: len(text) - keep], ""
            reasoning, text = text[:end], text[end + len(THINK_CLOSE) :]
            self._state = "lead"
            return reasoning, self._content(text)
        return "", self._content(text)

    def _content(self, text: str) -> str:
        if self._state == "lead":
            text = text.lstrip()
            if not text:
                return ""
            self._state = "content"
        return text

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return held, ""
        return "", held if self._state == "start" else ""


def split_reasoning(text: str, in_reasoning: bool) -> tuple[str | None, str]:
    """Whole-output form: (reasoning_content or None when the model did not reason, content)."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2
