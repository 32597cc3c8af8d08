"""Per-request sampling settings (OpenAI / vLLM semantics), validated on construction so a bad request is
refused with an error naming the field before it reaches the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from deepfleet.structured.spec import StructuredOutput
from deepfleet.watermark.config import WatermarkConfig

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
PENALTY_RANGE = 2.0  # presence/frequency penalties live in [-2, 2] (OpenAI)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
LOGIT_BIAS_RANGE = 100.0  # OpenAI: biases in [-100, 100]


def _number(name: str, value: object) -> float:
    # bool is an int subclass; `temperature=True` is a client bug, not 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    return value


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int = 16
    logprobs: int | None = None  # number of top logprobs to return per token, 0..20
    prompt_logprobs: int | None = None  # vLLM's: logprob of every prompt token (and its top ones), 0..20
    skip_special_tokens: bool = True
    watermark: WatermarkConfig | None = None  # green-list watermark of this request's output (off when None)
    # applied by engine/logits_processors.py
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0  # end tokens (EOS, stop_token_ids) are masked until this many were generated
    structured: StructuredOutput | None = None  # grammar the output must follow

    def __post_init__(self) -> None:
        if _integer("n", self.n) < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")
        if _number("temperature", self.temperature) < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < _number("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if _integer("top_k", self.top_k) < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= _number("min_p", self.min_p) <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if _number("repetition_penalty", self.repetition_penalty) <= 0:
            raise ValueError(f"repetition_penalty: must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_RANGE <= _number(name, getattr(self, name)) <= PENALTY_RANGE:
                raise ValueError(f"{name}: must be in [-{PENALTY_RANGE}, {PENALTY_RANGE}], got {getattr(self, name)}")
        if self.seed is not None and not SEED_RANGE[0] <= _integer("seed", self.seed) <= SEED_RANGE[1]:
            raise ValueError(f"seed: must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}")
        if _integer("max_tokens", self.max_tokens) < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= _integer("logprobs", self.logprobs) <= MAX_LOGPROBS:
            raise ValueError(f"logprobs: must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= _integer("prompt_logprobs", self.prompt_logprobs) <= (
                MAX_LOGPROBS):
            raise ValueError(f"prompt_logprobs: must be in 0..{MAX_LOGPROBS}, got {self.prompt_logprobs}")
        if not 0 <= _integer("min_tokens", self.min_tokens) <= self.max_tokens:
            raise ValueError(f"min_tokens: must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for token_id, bias in (self.logit_bias or {}).items():
            if _integer("logit_bias", token_id) < 0 or not -LOGIT_BIAS_RANGE <= _number("logit_bias", bias) <= (
                    LOGIT_BIAS_RANGE):
                raise ValueError(f"logit_bias: token ids >= 0 with biases in [-{LOGIT_BIAS_RANGE:g}, "
                                 f"{LOGIT_BIAS_RANGE:g}], got {token_id}: {bias}")
        self.stop = self._validated_stop(self.stop)
        if self.watermark is not None and not isinstance(self.watermark, WatermarkConfig):
            raise ValueError(f"watermark: expected a WatermarkConfig, got {type(self.watermark).__name__}")
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(self.stop_token_ids)
            for token_id in self.stop_token_ids:
                if _integer("stop_token_ids", token_id) < 0:
                    raise ValueError(f"stop_token_ids: token ids must be >= 0, got {token_id}")

    @staticmethod
    def _validated_stop(stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else list(stop)
        for s in stops:
            if not isinstance(s, str):
                raise ValueError(f"stop: must be strings, got {s!r}")
            if not s:
                raise ValueError("stop: empty stop string")
        return stops

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
