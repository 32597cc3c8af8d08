"""Acceptance of drafted tokens from one target forward over each sequence's last token and its k drafts.

Rows per sequence: 1 + k logits rows; row i is the target's distribution p_i of the token after the i-th input
(row 0 scores draft 1, ..., row k gives the bonus token once every draft is accepted). The drafts are
deterministic proposals (prompt lookup, the MTP layer's argmax), i.e. a one-hot draft distribution q, so:

- greedy: draft i is accepted while it equals argmax p_i; the first mismatch is replaced by argmax p_i, and when
  all k match the bonus argmax p_k follows. Every emitted token is the argmax of the target given the tokens
  before it: exactly the non-speculative greedy output.
- temperature > 0 (Leviathan et al. 2023 / Chen et al. 2023 with q one-hot): accept draft d with probability
  min(1, p_i(d) / q(d)) = p_i(d); on rejection draw from the residual max(0, p_i - q) normalised, which is p_i
  without d. Each emitted token is distributed as p_i given the tokens before it. p_i is the probability the
  sampler would draw from: temperature, top-k, top-p and min-p applied as in engine/sampler.py.

Requests whose sampling depends on their own output so far (penalties, logits processors such as grammars or
logit_bias) or that ask for logprobs are not drafted for (spec_decode/speculator.py) and never come here.
Everything runs on the device; the host receives one small tensor per step."""

from __future__ import annotations

import torch

from deepfleet.engine.sampler import Sampler, SamplingState, _row_tensor, to_device


def _target_probs(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    params = [s.params for s in states]
    logits = logits.float() / _row_tensor([p.temperature if not p.greedy else 1.0 for p in params], logits)
    logits = Sampler._apply_top_k_top_p(logits, params)
    return Sampler._apply_min_p(torch.softmax(logits, dim=-1), params)


def _uniform(states: list[SamplingState], like: torch.Tensor) -> torch.Tensor:
    u = torch.rand(len(states), device=like.device)
    for row, s in enumerate(states):
        if s.generator is not None:
            u[row] = torch.rand(1, device=like.device, generator=s.generator)[0]
    return u


def verify(logits: torch.Tensor, states: list[SamplingState], drafts: list[list[int]]) -> list[list[int]]:
    """logits [sum(1 + len(d)), V] in sequence order -> per sequence the emitted tokens: the accepted drafts and
    one token of the target's (1 .. len(d) + 1 tokens)."""
    counts = [1 + len(d) for d in drafts]
    if logits.shape[0] != sum(counts):
        raise ValueError(f"logits: expected {sum(counts)} rows for {len(drafts)} sequences, got {logits.shape[0]}")
    row_states = [s for s, n in zip(states, counts, strict=True) for _ in range(n)]
    # the token each row scores: the next draft, or -1 on a sequence's last (bonus) row
    scored = [t for d in drafts for t in (*d, -1)]
    scored_t = to_device(torch.tensor(scored), logits.device)
    greedy_tokens = logits.argmax(dim=-1)
    if all(s.params.greedy for s in states):
        accept, token = greedy_tokens == scored_t, greedy_tokens
    else:
        probs = _target_probs(logits, row_states)
        index = scored_t.clamp_min(0).unsqueeze(1)
        accept = _uniform(row_states, probs) < probs.gather(1, index).squeeze(1)
        residual = torch.where((scored_t >= 0).unsqueeze(1), probs.scatter(1, index, 0.0), probs)
        token = Sampler._draw(residual, row_states)
        is_greedy = to_device(torch.tensor([s.params.greedy for s in row_states]), logits.device)
        accept = torch.where(is_greedy, greedy_tokens == scored_t, accept)
        token = torch.where(is_greedy, greedy_tokens, token)
    flags, tokens = torch.stack([accept.long(), token]).tolist()  # the step's one device->host transfer
    out, row = [], 0
    for d in drafts:
        emitted = []
        for i, draft in enumerate(d):
            if not flags[row + i]:
                emitted.append(tokens[row + i])
                break
            emitted.append(draft)
        else:
            emitted.append(tokens[row + len(d)])
        out.append(emitted)
        row += len(d) + 1
    return out
