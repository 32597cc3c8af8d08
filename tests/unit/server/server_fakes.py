"""GatedFakeEngine: a stand-in that follows the LLMEngine contract, for the few tests that need exact control
over timing (admission queue full, priority order, timeouts, a crashing engine). Everything else in the server
tests runs the real engine."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from deepfleet.engine.outputs import CompletionOutput, EngineStats, RequestOutput


class FakeTokenizer:
    vocab_size = 128
    eos_token_ids = {0}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + ord(c) % 100 for c in text] or [1]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return "".join(m["content"] for m in messages) + "<think>\n"


@dataclass
class _Request:
    prompt: list[int]
    max_tokens: int
    deadline: float | None
    generated: int = 0


class GatedFakeEngine:
    """Generates one 'x' per step per request, only while `gate` is set; `fail` makes step() raise."""

    max_model_len = 64
    max_num_seqs = 16
    model_name = "fake"

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.gate = threading.Event()
        self.fail = False
        self.added: list[tuple[str, int]] = []  # (request id, priority), in the order the engine got them
        self.requests: dict[str, _Request] = {}
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params, priority=0, deadline=None) -> None:
        self.added.append((request_id, priority))
        self.requests[request_id] = _Request(list(prompt), params.max_tokens, deadline)

    def abort_request(self, request_id) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.fail:
            raise RuntimeError("simulated CUDA error")
        if not self.gate.is_set():
            time.sleep(0.002)
            return []
        outputs = []
        for rid, r in list(self.requests.items()):
            r.generated += 1
            timed_out = r.deadline is not None and time.monotonic() >= r.deadline
            reason = "timeout" if timed_out else ("length" if r.generated >= r.max_tokens else None)
            if reason:
                del self.requests[rid]
            completion = CompletionOutput(0, "x" * r.generated, [7] * r.generated, reason)
            outputs.append(RequestOutput(rid, None, r.prompt, [completion], reason is not None))
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(len(self.requests), 0, 0.1 * len(self.requests), 0, 0, 0, 0, 0)


class ScriptedEngine(GatedFakeEngine):
    """Answers every request with `script`, one character per step (token id = the character's code point), then
    stops: for exact output text (odd Unicode, tool-call markup) through the real server path."""

    def __init__(self, script: str, chat_templates: dict[str, str] | None = None) -> None:
        super().__init__()
        self.script = script
        self.tokenizer.chat_templates = chat_templates or {}
        self.gate.set()

    def step(self) -> list[RequestOutput]:
        outputs = []
        for rid, r in list(self.requests.items()):
            r.generated += 1
            done = r.generated >= min(len(self.script), r.max_tokens)
            if done:
                del self.requests[rid]
            text = self.script[: r.generated]
            reason = None if not done else ("stop" if r.generated == len(self.script) else "length")
            completion = CompletionOutput(0, text, [ord(c) for c in text], reason)
            outputs.append(RequestOutput(rid, None, r.prompt, [completion], done))
        return outputs
