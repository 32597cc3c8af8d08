"""Batched token sampling over [N, V] logits with per-row parameters (vLLM / OpenAI semantics).

Order: repetition penalty (prompt + output tokens), presence/frequency penalties (output tokens),
temperature, top-k, top-p, min-p, then a draw. Greedy rows take the argmax of the penalised logits.
Every branch is decided from the Python-side parameters, so the only host sync is the final `.tolist()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepfleet.engine.sampling_params import SamplingParams


@dataclass
class SamplingState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # seeded per request (make_generator) when params.seed is set


@dataclass
class SampledToken:
    token_id: int
    logprob: float  # of the chosen token, from the raw (unpenalised, untempered) logits
    top_logprobs: dict[int, float] | None = None  # the params.logprobs most likely tokens, when requested


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own RNG: its draws do not depend on which other requests share the batch."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A [N, 1] column of per-row parameters, ready to broadcast against [N, V]."""
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True).unsqueeze(1)


def _token_counts(token_lists: list[list[int]], vocab_size: int, like: torch.Tensor) -> torch.Tensor:
    """[N, V] occurrence counts; rows are padded with an extra column V that is dropped afterwards."""
    width = max(map(len, token_lists), default=0)
    padded = [ids + [vocab_size] * (width - len(ids)) for ids in token_lists]
    index = torch.tensor(padded, dtype=torch.long).to(like.device, non_blocking=True)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=like.dtype, device=like.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=like.dtype))
    return counts[:, :vocab_size]


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[SamplingState]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits: expected shape [{len(seqs)}, vocab], got {list(logits.shape)}")
        logits = logits.float()
        params = [s.params for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = self._apply_penalties(logits.clone(), seqs)
        greedy_tokens = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            tokens = greedy_tokens
        else:
            # greedy rows divide by 1 so they stay finite; their draw is replaced by the argmax below
            logits = logits / _row_tensor([p.temperature if not p.greedy else 1.0 for p in params], logits)
            logits = self._apply_top_k_top_p(logits, params)
            probs = self._apply_min_p(torch.softmax(logits, dim=-1), params)
            sampled = self._draw(probs, seqs)
            is_greedy = torch.tensor([p.greedy for p in params]).to(logits.device, non_blocking=True)
            tokens = torch.where(is_greedy, greedy_tokens, sampled)

        chosen_logprobs = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        max_top = max((p.logprobs or 0 for p in params), default=0)
        top = raw_logprobs.topk(max_top, dim=-1) if max_top else None

        token_list, logprob_list = tokens.tolist(), chosen_logprobs.tolist()  # first call syncs; second is a copy
        top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        out = []
        for row, p in enumerate(params):
            top_logprobs = None
            if p.logprobs is not None:  # top is None when every row asked for logprobs=0 (no top-k computed)
                top_logprobs = {} if top is None else dict(
                    zip(top_ids[row][: p.logprobs], top_values[row][: p.logprobs], strict=True))
            out.append(SampledToken(token_list[row], logprob_list[row], top_logprobs))
        return out

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[SamplingState]) -> torch.Tensor:
        vocab_size = logits.shape[1]
        params = [s.params for s in seqs]
        if any(p.repetition_penalty != 1.0 for p in params):
            # only penalised rows pay for building their token lists
            seen = _token_counts(
                [s.prompt_token_ids + s.output_token_ids if s.params.repetition_penalty != 1.0 else [] for s in seqs],
                vocab_size,
                logits,
            ) > 0
            penalty = _row_tensor([p.repetition_penalty for p in params], logits)
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            counts = _token_counts(
                [s.output_token_ids if s.params.presence_penalty or s.params.frequency_penalty else [] for s in seqs],
                vocab_size,
                logits,
            )
            logits = logits - _row_tensor([p.frequency_penalty for p in params], logits) * counts
            logits = logits - _row_tensor([p.presence_penalty for p in params], logits) * (counts > 0)
        return logits

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        use_top_k = any(p.top_k > 0 for p in params)
        use_top_p = any(p.top_p < 1.0 for p in params)
        if not (use_top_k or use_top_p):
            return logits
        vocab_size = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if use_top_k:
            k = torch.tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params])
            kth = sorted_logits.gather(1, (k - 1).to(logits.device, non_blocking=True).unsqueeze(1))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if use_top_p:
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the top token always has 0 before it
            top_p = _row_tensor([p.top_p for p in params], logits)
            # rows with top_p == 1 are exempt: float cumsum can exceed 1 and would cut the tail
            remove = (mass_before > top_p) & (top_p < 1.0)
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    @staticmethod
    def _apply_min_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        if not any(p.min_p > 0 for p in params):
            return probs
        threshold = _row_tensor([p.min_p for p in params], probs) * probs.amax(dim=-1, keepdim=True)
        return probs.masked_fill(probs < threshold, 0.0)

    @staticmethod
    def _draw(probs: torch.Tensor, seqs: list[SamplingState]) -> torch.Tensor:
        """Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (unnormalised p is fine)
        without the host sync of torch.multinomial; seeded rows draw E from their own generator."""
        noise = torch.empty_like(probs)
        seeded = [row for row, s in enumerate(seqs) if s.generator is not None]
        if len(seeded) < len(seqs):
            noise.exponential_()
        for row in seeded:
            noise[row].exponential_(generator=seqs[row].generator)
        # an exact 0 from exponential_ would turn a masked token's 0/0 into NaN, which argmax picks
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
