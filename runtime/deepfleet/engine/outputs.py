"""What the engine reports: per-request outputs (cumulative) and engine-wide stats. Plain data without torch, so
the server process can receive them from the engine process without loading torch itself."""

from __future__ import annotations

from dataclasses import dataclass

from deepfleet.engine.spec_decode.metrics import SpecDecodeStats


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "timeout"
    logprobs: list[dict] | None = None  # per token: {"token_id", "logprob", "top_logprobs": {id: lp}}
    stop_reason: str | int | None = None


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
