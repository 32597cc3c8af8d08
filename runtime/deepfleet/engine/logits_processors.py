"""The per-request logits processors of the OpenAI parameters, for the sampler's one hook
(`SamplingState.logits_processors`: `(output token ids, logits row) -> logits row`, applied before penalties):
`logit_bias`, `min_tokens` (end tokens masked until then) and grammar masks (structured output). A request that
asks for none of them gets no processor, so it pays nothing.

Everything a processor needs on the device is built once per request (bias values) or per step on the host from
Python-side state (the grammar bitmasks, filled by the matchers into one pinned bitmask of the batch, copied and
applied once per step: structured/xgrammar_backend.apply_masks); the matcher follows the output ids the engine
already has on the host, so there is no extra host sync per token.
Logprobs stay those of the raw logits (the sampler takes them before the hook)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.structured.spec import StructuredOutput

Processor = Callable[[list[int], torch.Tensor], torch.Tensor]


class LogitsProcessors:
    def __init__(self, eos_token_ids: set[int], vocab_size: int,
                 grammar_compiler: Callable[[], Any] | None = None) -> None:
        """`grammar_compiler`: builds a structured.xgrammar_backend.GrammarCompiler at the first structured request;
        None: structured output is refused."""
        self.eos_token_ids = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self._build_grammars = grammar_compiler
        self._grammars: Any = None

    @property
    def grammars(self) -> Any:
        if self._grammars is None:
            self._grammars = self._build_grammars()
        return self._grammars

    def check(self, params: SamplingParams) -> None:
        """Refuse what cannot be applied (ValueError naming the field)."""
        bad = [t for t in (params.logit_bias or {}) if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token ids must be in [0, {self.vocab_size}), got {bad[:3]}")
        if params.structured is not None and self._build_grammars is None:
            raise ValueError(f"{params.structured.field}: structured output is not available (xgrammar missing)")

    def submit(self, spec: StructuredOutput) -> Any:
        """Start compiling (a future); the engine loop waits for it without blocking other requests."""
        return self.grammars.submit(spec)

    def for_request(self, params: SamplingParams) -> list[Processor]:
        """The request's processors (a grammar not compiled yet is compiled here, bounded by the timeout)."""
        out: list[Processor] = []
        if params.logit_bias:
            out.append(_LogitBias(params.logit_bias))
        if params.min_tokens:
            out.append(_MinTokens(params.min_tokens, {*self.eos_token_ids, *(params.stop_token_ids or ())}))
        if params.structured is not None:
            from deepfleet.structured.xgrammar_backend import GrammarMask

            spec = params.structured
            out.append(GrammarMask(self.grammars.result(spec, self.grammars.submit(spec))))
        return out


class _LogitBias:
    def __init__(self, bias: dict[int, float]) -> None:
        self._ids = list(bias)
        self._values = list(bias.values())
        self._device: tuple[torch.Tensor, torch.Tensor] | None = None  # on the logits' device, built once

    def __call__(self, _output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        if self._device is None or self._device[0].device != row.device:
            self._device = (torch.tensor(self._ids).to(row.device, non_blocking=True),
                            torch.tensor(self._values, dtype=row.dtype).to(row.device, non_blocking=True))
        return row.index_add_(0, *self._device)


class _MinTokens:
    def __init__(self, min_tokens: int, end_ids: set[int]) -> None:
        self._min = min_tokens
        self._end = sorted(end_ids)

    def __call__(self, output_ids: list[int], row: torch.Tensor) -> torch.Tensor:
        if len(output_ids) < self._min:
            row[self._end] = float("-inf")
        return row
