"""Acceptance of drafts (engine/spec_decode/verify.py), checked against distributions the test computes itself:
with temperature > 0, each emitted token must follow the target distribution given the tokens before it, whatever
the draft (a bounded sample of 20,000 verifications, chi-square at p = 1e-4); greedy accepts exactly while the
draft is the argmax."""

from __future__ import annotations

import pytest
import torch

from deepfleet.engine.sampler import SamplingState
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.spec_decode import ngram
from deepfleet.engine.spec_decode.verify import verify

N = 20_000
CHI2_P1E4 = {2: 18.42, 3: 21.11, 4: 23.51}  # chi-square quantile at 1 - 1e-4 by degrees of freedom

LOGITS = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.9],   # row 0: scores draft 1
                       [0.1, 1.2, 1.1, 0.0, -0.5],   # row 1: scores draft 2
                       [1.0, -1.0, 0.5, 0.2, 0.0]])  # row 2: the bonus token


def _expected(row: int, temperature: float, top_k: int) -> torch.Tensor:
    z = LOGITS[row] / temperature
    kth = z.sort(descending=True).values[top_k - 1]
    z = z.masked_fill(z < kth, float("-inf"))
    return torch.softmax(z, dim=0)


def _chi2(samples: list[int], p: torch.Tensor) -> tuple[float, int]:
    counts = torch.bincount(torch.tensor(samples), minlength=len(p)).double()
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    expected = p[support].double() * len(samples)
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def _run(drafts: list[int], params: SamplingParams) -> list[list[int]]:
    torch.manual_seed(0)
    states = [SamplingState(params, [1], []) for _ in range(N)]
    return verify(LOGITS.repeat(N, 1), states, [drafts] * N)


@pytest.mark.parametrize("drafts", [[0, 2], [1, 1], [3, 4]])  # likely, middling, outside top-k (never accepted)
def test_rejection_sampling_keeps_the_target_distribution(drafts):
    t, k = 0.7, 4
    out = _run(drafts, SamplingParams(temperature=t, top_k=k))
    assert all(1 <= len(o) <= 3 for o in out)
    stat, df = _chi2([o[0] for o in out], _expected(0, t, k))
    assert stat < CHI2_P1E4[df]
    # given the first draft was accepted, the next token follows row 1's distribution
    after = [o[1] for o in out if o[0] == drafts[0] and len(o) > 1]
    p0 = _expected(0, t, k)[drafts[0]]
    assert abs(len(after) - N * p0) <= 5 * (N * p0 * (1 - p0)) ** 0.5
    if len(after) > 1000:
        stat, df = _chi2(after, _expected(1, t, k))
        assert stat < CHI2_P1E4[df]
    if drafts[0] == 3:  # outside the top-k: probability 0, always rejected
        assert all(len(o) == 1 for o in out)


def test_greedy_accepts_while_the_draft_is_the_argmax():
    states = [SamplingState(SamplingParams(temperature=0), [1], []) for _ in range(4)]
    drafts = [[0, 1], [0, 2], [1, 1], []]
    logits = torch.cat([LOGITS, LOGITS, LOGITS, LOGITS[:1]])
    # argmax per row: 0, 1, 0
    assert verify(logits, states, drafts) == [[0, 1, 0], [0, 1], [0], [0]]


def test_greedy_and_sampled_rows_mix_in_one_batch():
    torch.manual_seed(1)
    states = [SamplingState(SamplingParams(temperature=0), [1], []),
              SamplingState(SamplingParams(temperature=1.0, seed=3), [1], [])]
    out = verify(torch.cat([LOGITS, LOGITS]), states, [[0, 1], [4, 4]])
    assert out[0] == [0, 1, 0]
    assert 1 <= len(out[1]) <= 3


def test_row_count_must_match_the_drafts():
    states = [SamplingState(SamplingParams(temperature=0), [1], [])]
    with pytest.raises(ValueError, match="expected 3 rows for 1 sequences, got 2"):
        verify(LOGITS[:2], states, [[0, 1]])


@pytest.mark.parametrize(("tokens", "k", "expected"), [
    ([1, 2, 3, 9, 1, 2, 3], 2, [9, 1]),      # the longest suffix (3) found earlier: what followed it
    ([5, 1, 2, 7, 1, 2, 8, 1, 2], 3, [8, 1, 2]),  # the most recent earlier occurrence wins
    ([4, 5, 6], 2, []),                      # nothing repeats
    ([7, 7], 3, [7]),                        # followed by only one token before the end
])
def test_prompt_lookup(tokens, k, expected):
    assert ngram.propose(tokens, k, 1, 3) == expected
