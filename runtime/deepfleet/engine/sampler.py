"""Batched token sampling over [N, V] logits with per-row parameters (vLLM / OpenAI semantics).

Order: repetition penalty (prompt + output tokens), presence/frequency penalties (output tokens),
temperature, top-k, top-p, min-p, then a draw. Greedy rows take the argmax of the penalised logits.
Every branch is decided from the Python-side parameters, so the only host sync is the final `.tolist()`, and the
engine may queue the next step before that (async scheduling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from deepfleet.engine.sampling_params import SamplingParams

# (output token ids so far, this row's logits [V]) -> logits [V]; may modify the row in place
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # append-only while the request runs (the engine appends each sampled token)
    generator: torch.Generator | None = None  # seeded per request (make_generator) when params.seed is set
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # see Sampler: the per-request hook
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
    logprob: float | None  # of the chosen token, from the raw (unprocessed) logits; None unless logprobs asked
    top_logprobs: dict[int, float] | None = None  # the params.logprobs most likely tokens, when requested


def reads_output(s: SamplingState) -> bool:
    """Its sampling reads its output so far: penalties or logits processors apply to its logits."""
    p = s.params
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or bool(s.logits_processors))


def argmax_only(s: SamplingState) -> bool:
    """Greedy, no logprobs, nothing applied to its logits: its token is the argmax of its row."""
    return s.params.temperature == 0 and s.params.logprobs is None and not reads_output(s)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own RNG: its draws do not depend on which other requests share the batch."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without waiting for the GPU: a copy from pageable memory first waits for the stream
    (the step in flight), one from pinned memory is queued behind it."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A [N, 1] column of per-row parameters, ready to broadcast against [N, V]."""
    return to_device(torch.tensor(values, dtype=like.dtype), like.device).unsqueeze(1)


def _token_counts(arrays: list[np.ndarray | None], vocab_size: int, like: torch.Tensor) -> torch.Tensor:
    """[N, V] occurrence counts of each row's token ids (None: a row that needs none), built from one flat index
    copied to the device in one transfer. Counts are small integers, so float atomics add them exactly."""
    rows = [a + row * vocab_size for row, a in enumerate(arrays) if a is not None and len(a)]
    counts = torch.zeros(len(arrays) * vocab_size, dtype=like.dtype, device=like.device)
    if rows:
        index = to_device(torch.from_numpy(np.concatenate(rows)), like.device)
        counts.index_add_(0, index, torch.ones(1, dtype=like.dtype, device=like.device).expand(len(index)))
    return counts.view(len(arrays), vocab_size)


class SampleResult:
    """One step's draw, still on the device: `token_ids` [N] feeds the next step's inputs without a host round
    trip; `to_host()` brings tokens (and logprobs, when asked) back in one transfer. `start_copy()` queues that
    transfer into pinned memory behind the GPU work so the host can do other things until it needs the values."""

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, logprobs_wanted: list[int | None]):
        self.token_ids = token_ids
        self._packed = packed  # [N] tokens, or [N, 2 + 2k] float: token, chosen logprob, top ids, top values
        self._logprobs_wanted = logprobs_wanted
        self._event: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        if self._packed.device.type == "cuda" and self._event is None:
            host = torch.empty(self._packed.shape, dtype=self._packed.dtype, pin_memory=True)
            host.copy_(self._packed, non_blocking=True)
            self._packed, self._event = host, torch.cuda.Event()
            self._event.record()

    def wait(self) -> None:
        """Until the step's values are on the host (start_copy ran) or computed (it did not)."""
        if self._event is not None:
            self._event.synchronize()

    def to_host(self) -> list[SampledToken]:
        token_ids, sampled = self.to_host_ids()
        return sampled if sampled is not None else [SampledToken(token, None) for token in token_ids]

    def to_host_ids(self) -> tuple[list[int], list[SampledToken] | None]:
        """(the token ids, and per row a SampledToken with its logprobs, or None where no row asked for
        logprobs: the engine's per-step path then builds no object per token)."""
        self.wait()
        values = self._packed.tolist()  # the step's only device->host transfer (a no-op copy once start_copy ran)
        if self._packed.dim() == 1:
            return values, None
        k = (self._packed.shape[1] - 2) // 2
        out = []
        for row, wanted in zip(values, self._logprobs_wanted, strict=True):
            token = int(row[0])
            if wanted is None:
                out.append(SampledToken(token, None))
                continue
            ids, lps = row[2 : 2 + k][:wanted], row[2 + k :][:wanted]
            out.append(SampledToken(token, row[1], {int(i): lp for i, lp in zip(ids, lps, strict=True)}))
        return [s.token_id for s in out], out


class Sampler:
    """`sample` is the step's device-side draw; `__call__` is sample + to_host for callers that want values now.

    Per-request logits processing has one hook: `SamplingState.logits_processors`, callables
    `(output_token_ids, logits_row) -> logits_row` applied first, before penalties (logit_bias, min_tokens,
    watermarks), and grammar masks (structured/xgrammar_backend.GrammarMask), which fill their rows of one bitmask
    applied to the batch in one call after a row's other processors (masking to -inf commutes with theirs: they
    add to logits or mask them). Fast paths: an all-greedy batch with nothing to apply is one argmax (no
    softmax, no copy); the logprobs' normaliser is computed only when some row asked for them."""

    def __call__(self, logits: torch.Tensor, seqs: list[SamplingState]) -> list[SampledToken]:
        return self.sample(logits, seqs).to_host()

    def sample(self, logits: torch.Tensor, seqs: list[SamplingState], all_argmax: bool = False) -> SampleResult:
        """`all_argmax`: the caller knows every row is `argmax_only` (the engine decides it once per request)."""
        if logits.dim() != 2 or logits.shape[0] != len(seqs):
            raise ValueError(f"logits: expected shape [{len(seqs)}, vocab], got {list(logits.shape)}")
        if all_argmax or all(map(argmax_only, seqs)):  # (one pass over the rows, not one per parameter below)
            tokens = logits.argmax(dim=-1)
            return SampleResult(tokens, tokens, [None] * len(seqs))
        params = [s.params for s in seqs]
        wanted = [p.logprobs for p in params]
        # logprobs are of the raw logits (x - logsumexp x): the [N, vocab] log_softmax is never materialised, only
        # the rows' normaliser, then the chosen and top entries (nothing below changes `raw` in place)
        raw = logits.float() if any(w is not None for w in wanted) else None
        logits = self._apply_logits_processors(logits, seqs)
        logits = self._apply_penalties(logits, seqs)
        if all(p.greedy for p in params):
            tokens = logits.argmax(dim=-1)
        else:
            logits = logits.float()
            greedy_tokens = logits.argmax(dim=-1)
            # greedy rows divide by 1 so they stay finite; their draw is replaced by the argmax below
            logits = logits / _row_tensor([p.temperature if not p.greedy else 1.0 for p in params], logits)
            logits = self._apply_top_k_top_p(logits, params)
            probs = self._apply_min_p(torch.softmax(logits, dim=-1), params)
            tokens = self._draw(probs, seqs)
            if any(p.greedy for p in params):
                is_greedy = to_device(torch.tensor([p.greedy for p in params]), logits.device)
                tokens = torch.where(is_greedy, greedy_tokens, tokens)
        if raw is None:
            return SampleResult(tokens, tokens, wanted)
        log_norm = torch.logsumexp(raw, dim=-1, keepdim=True)
        chosen = raw.gather(1, tokens.unsqueeze(1)) - log_norm
        # [N, 0] when every row asked for logprobs=0: each row then gets an empty dict
        top = raw.topk(max(w or 0 for w in wanted), dim=-1)
        packed = torch.cat([tokens.unsqueeze(1).float(), chosen, top.indices.float(), top.values - log_norm], dim=1)
        return SampleResult(tokens, packed, wanted)

    @staticmethod
    def _apply_logits_processors(logits: torch.Tensor, seqs: list[SamplingState]) -> torch.Tensor:
        rows = [row for row, s in enumerate(seqs) if s.logits_processors]
        if not rows:
            return logits
        logits = logits.float().clone()  # processors may work in place; the caller's logits stay as they were
        masks = []  # grammar masks (they have fill_mask): the whole batch's at once, after the row's others
        for row in rows:
            for processor in seqs[row].logits_processors:
                if hasattr(processor, "fill_mask"):
                    masks.append((row, processor, seqs[row].output_token_ids))
                else:
                    logits[row] = processor(seqs[row].output_token_ids, logits[row])
        if masks:
            from deepfleet.structured.xgrammar_backend import apply_masks

            apply_masks(logits, masks)
        return logits

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
