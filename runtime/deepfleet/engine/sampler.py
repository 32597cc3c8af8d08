"""Batched token sampling over [N, V] logits with per-row parameters (vLLM / OpenAI semantics).

Order: repetition penalty (prompt + output tokens), presence/frequency penalties (output tokens),
temperature, top-k, top-p, min-p, then a draw. Greedy rows take the argmax of the penalised logits.
Every branch is decided from the Python-side parameters, so the only host sync is the final `.tolist()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from deepfleet.engine.sampling_params import SamplingParams


@dataclass
class SamplingState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # append-only while the request runs (the engine appends each sampled token)
    generator: torch.Generator | None = None  # seeded per request (make_generator) when params.seed is set
    # penalties need the token ids as arrays every step: convert the prompt once and the output incrementally
    _prompt_array: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _output_array: np.ndarray = field(
        default_factory=lambda: np.empty(0, np.int64), init=False, repr=False, compare=False
    )

    def prompt_array(self) -> np.ndarray:
        if self._prompt_array is None:
            self._prompt_array = np.asarray(self.prompt_token_ids, dtype=np.int64)
        return self._prompt_array

    def output_array(self) -> np.ndarray:
        done, total = len(self._output_array), len(self.output_token_ids)
        if total < done:  # the list was rewritten rather than appended to
            self._output_array = np.asarray(self.output_token_ids, dtype=np.int64)
        elif total > done:
            tail = np.asarray(self.output_token_ids[done:], dtype=np.int64)
            self._output_array = np.concatenate([self._output_array, tail])
        return self._output_array


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


def _token_counts(arrays: list[np.ndarray | None], vocab_size: int, like: torch.Tensor) -> torch.Tensor:
    """[N, V] occurrence counts of each row's token ids (None: a row that needs none), built from one flat index
    copied to the device in one transfer. Counts are small integers, so float atomics add them exactly."""
    rows = [a + row * vocab_size for row, a in enumerate(arrays) if a is not None and len(a)]
    counts = torch.zeros(len(arrays) * vocab_size, dtype=like.dtype, device=like.device)
    if rows:
        index = torch.from_numpy(np.concatenate(rows)).to(like.device, non_blocking=True)
        counts.index_add_(0, index, torch.ones(1, dtype=like.dtype, device=like.device).expand(len(index)))
    return counts.view(len(arrays), vocab_size)


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
        token_list, logprob_list = tokens.tolist(), chosen_logprobs.tolist()  # first call syncs; later ones copy
        top_values = top_ids = None
        if any(p.logprobs is not None for p in params):
            # [N, 0] when every row asked for logprobs=0: each row then gets an empty dict
            top = raw_logprobs.topk(max(p.logprobs or 0 for p in params), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        out = []
        for row, p in enumerate(params):
            top_logprobs = None
            if p.logprobs is not None:
                top_logprobs = dict(zip(top_ids[row][: p.logprobs], top_values[row][: p.logprobs], strict=True))
            out.append(SampledToken(token_list[row], logprob_list[row], top_logprobs))
        return out

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[SamplingState]) -> torch.Tensor:
        vocab_size = logits.shape[1]
        params = [s.params for s in seqs]
        use_rep = [p.repetition_penalty != 1.0 for p in params]
        use_pf = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        if not any(use_rep) and not any(use_pf):
            return logits
        # only penalised rows pay for their token ids
        counts = _token_counts(
            [s.output_array() if rep or pf else None for s, rep, pf in zip(seqs, use_rep, use_pf, strict=True)],
            vocab_size,
            logits,
        )
        if any(use_rep):
            in_prompt = _token_counts(
                [s.prompt_array() if rep else None for s, rep in zip(seqs, use_rep, strict=True)], vocab_size, logits
            )
            seen = (in_prompt > 0) | (counts > 0)
            penalty = _row_tensor([p.repetition_penalty for p in params], logits)
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if any(use_pf):
            logits = logits - _row_tensor([p.frequency_penalty for p in params], logits) * counts
            logits = logits - _row_tensor([p.presence_penalty for p in params], logits) * (counts > 0)
        return logits

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Find each row's smallest kept logit among its best candidates, then mask everything below it.
        Candidates come from topk(max k) when every top-p row also has a top-k (far cheaper than sorting the
        vocabulary), else from a full sort. Ties with the smallest kept logit are kept."""
        filtered = [p.top_k > 0 or p.top_p < 1.0 for p in params]
        if not any(filtered):
            return logits
        vocab_size = logits.shape[1]
        if any(p.top_p < 1.0 and p.top_k == 0 for p in params):
            width = vocab_size
            candidates = logits.sort(dim=-1, descending=True).values
        else:
            width = min(max(p.top_k for p in params), vocab_size)
            candidates = logits.topk(width, dim=-1).values
        k = _row_tensor([min(p.top_k, width) if p.top_k > 0 else width for p in params], logits)
        removed = torch.arange(width, device=logits.device) >= k
        if any(p.top_p < 1.0 for p in params):
            probs = torch.softmax(candidates.masked_fill(removed, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # the best candidate always has 0 before it
            top_p = _row_tensor([p.top_p for p in params], logits)
            # rows with top_p == 1 are exempt: float cumsum can exceed 1 and would cut the tail
            removed |= (mass_before > top_p) & (top_p < 1.0)
        threshold = candidates.masked_fill(removed, float("inf")).amin(dim=-1, keepdim=True)
        threshold = threshold.masked_fill(~_row_tensor(filtered, logits).bool(), float("-inf"))
        return logits.masked_fill(logits < threshold, float("-inf"))

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
