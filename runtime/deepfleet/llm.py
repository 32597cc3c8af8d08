"""Offline batch inference with vLLM's interface: `LLM(model=...)`, `llm.generate(prompts, params)`, `llm.chat(...)`."""

from __future__ import annotations

import itertools
from typing import Any

from deepfleet.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from deepfleet.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_kwargs: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: {len(params_list)} given for {len(prompts)} prompts")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
                self.engine.add_request(rid, prompt, p, stream=False)  # only the finished outputs are read
        except ValueError:
            for rid in ids:  # all or nothing: drop the prompts already queued
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        # the template writes the BOS token itself, so the text is encoded without adding special tokens
        prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt), add_special_tokens=False)
                   for c in conversations]
        return self.generate(prompts, sampling_params)
