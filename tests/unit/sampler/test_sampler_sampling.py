"""Sampler semantics on small hand-made logits (CPU; the same code runs on CUDA)."""


import pytest
import torch

from deepfleet.engine.sampler import Sampler, SamplingState, make_generator
from deepfleet.engine.sampling_params import SamplingParams

VOCAB = 50


def state(prompt=(), output=(), seed=None, **params):
    p = SamplingParams(seed=seed, **params)
    generator = make_generator(seed, "cpu") if seed is not None else None
    return SamplingState(p, list(prompt), list(output), generator)


def random_logits(rows, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(4)
    out = Sampler()(logits, [state(temperature=0) for _ in range(4)])
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = random_logits(6, seed=1)
    seqs = [state(top_k=1) for _ in range(3)] + [state(top_p=1e-6) for _ in range(3)]
    torch.manual_seed(0)
    out = Sampler()(logits, seqs)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent():
    logits = random_logits(1, seed=2)
    alone = Sampler()(logits, [state(seed=7, temperature=1.3)])[0].token_id
    for other_seed in range(5):
        # a fresh generator with the same seed, between an unseeded and another seeded row
        seqs = [state(temperature=0.8), state(seed=7, temperature=1.3), state(seed=other_seed, top_k=5)]
        batch = torch.cat([random_logits(1, seed=5), logits, random_logits(1, seed=6)])
        assert Sampler()(batch, seqs)[1].token_id == alone


def test_seeded_stream_over_steps_matches_alone():
    logits = random_logits(1, seed=3)
    solo, batched = state(seed=11), state(seed=11)
    other = state()
    solo_tokens, batched_tokens = [], []
    for _ in range(20):
        solo_tokens.append(Sampler()(logits, [solo])[0].token_id)
        batched_tokens.append(Sampler()(torch.cat([random_logits(1), logits]), [other, batched])[1].token_id)
    assert solo_tokens == batched_tokens
    assert len(set(solo_tokens)) > 1  # it really sampled


def test_min_p_removes_tokens_below_fraction_of_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seqs = [state(min_p=0.5)]
    torch.manual_seed(0)
    drawn = {Sampler()(probs.log(), seqs)[0].token_id for _ in range(200)}
    assert drawn == {0, 1}  # 0.15 and 0.05 are below 0.5 * 0.5


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    torch.manual_seed(0)
    drawn = {Sampler()(logits, [state(top_p=0.7)])[0].token_id for _ in range(200)}
    assert drawn == {0, 1}


def test_penalties_on_a_hand_made_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    # repetition: tokens 0 (prompt) and 1 (output) seen; positive divided, negative multiplied
    rep = Sampler._apply_penalties(logits.clone(), [state(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert rep.tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0]]
    # presence/frequency over output tokens only: token 3 twice, token 2 once, prompt token 4 untouched
    pf = Sampler._apply_penalties(
        logits.clone(), [state(prompt=[4], output=[3, 2, 3], presence_penalty=0.5, frequency_penalty=0.25)]
    )
    assert pf.tolist() == [[2.0, -1.0, 0.5 - 0.5 - 0.25, 3.0 - 0.5 - 0.5, -2.0]]


def test_penalties_apply_per_row():
    logits = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    seqs = [state(output=[0], repetition_penalty=4.0), state(output=[0])]
    assert Sampler._apply_penalties(logits.clone(), seqs).tolist() == [[0.25, 1.0], [1.0, 1.0]]


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert Sampler()(logits, [state(output=[0], temperature=0, presence_penalty=0.5)])[0].token_id == 1


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = random_logits(2, seed=4)
    seqs = [state(temperature=0, logprobs=3, repetition_penalty=1.5, prompt=[0, 1]), state(logprobs=0, seed=1)]
    out = Sampler()(logits, seqs)
    ref = torch.log_softmax(logits, -1)
    for row, tok in enumerate(out):
        assert tok.logprob == pytest.approx(ref[row, tok.token_id].item(), abs=1e-6)
    values, ids = ref[0].topk(3)
    assert out[0].top_logprobs == pytest.approx(dict(zip(ids.tolist(), values.tolist(), strict=True)))
    assert out[1].top_logprobs == {}


def test_no_logprobs_requested_gives_none_and_zero_gives_only_the_chosen_one():
    assert Sampler()(random_logits(1), [state()])[0].top_logprobs is None
    out = Sampler()(random_logits(2), [state(logprobs=0), state(logprobs=0, temperature=0)])
    assert [t.top_logprobs for t in out] == [{}, {}] and all(t.logprob <= 0 for t in out)


def test_temperature_reshapes_the_distribution():
    base = torch.tensor([0.5, 0.3, 0.2])
    draws = 4000
    for temperature in (1.0, 2.0):
        torch.manual_seed(1234)
        out = Sampler()(base.log().expand(draws, 3), [state(temperature=temperature) for _ in range(draws)])
        counts = torch.bincount(torch.tensor([t.token_id for t in out]), minlength=3).double() / draws
        expected = base ** (1 / temperature)
        expected /= expected.sum()
        sigma = (expected * (1 - expected) / draws).sqrt()
        assert ((counts - expected).abs() < 4 * sigma).all(), (temperature, counts, expected)


def test_mixed_batch_and_masked_vocabulary():
    logits = random_logits(3, seed=8)
    logits[:, 10:] = float("-inf")  # e.g. padded vocabulary rows never get sampled
    seqs = [state(temperature=0), state(top_k=3, top_p=0.9, min_p=0.1), state(temperature=2.0, seed=3)]
    torch.manual_seed(0)
    for _ in range(20):
        out = Sampler()(logits, seqs)
        assert all(t.token_id < 10 and t.logprob is None for t in out)
    assert out[0].token_id == logits[0].argmax().item()


def test_wrong_logits_shape_is_refused():
    with pytest.raises(ValueError, match="logits"):
        Sampler()(random_logits(2), [state()])


def test_penalty_token_cache_follows_appends_and_rewrites():
    logits = torch.zeros(1, 6)
    seq = state(prompt=[4], presence_penalty=1.0, repetition_penalty=2.0)
    for token in (1, 2, 1, 5):
        seq.output_token_ids.append(token)
        fresh = state(prompt=[4], output=seq.output_token_ids, presence_penalty=1.0, repetition_penalty=2.0)
        assert torch.equal(Sampler._apply_penalties(logits, [seq]), Sampler._apply_penalties(logits, [fresh]))
    seq.output_token_ids[:] = [3]  # e.g. a recomputed sequence: the cache must not keep stale ids
    expected = torch.tensor([[0.0, 0.0, 0.0, -1.0, 0.0, 0.0]])
    assert torch.equal(Sampler._apply_penalties(logits, [seq]), expected)


@pytest.mark.parametrize("with_top_p_only_row", [False, True])  # topk candidates vs a full sort
def test_top_k_top_p_masks_per_row(with_top_p_only_row):
    probs = torch.tensor([0.5, 0.2, 0.18, 0.12])
    params = [
        SamplingParams(top_k=2),
        SamplingParams(),  # unfiltered: must keep every token even when candidates come from topk(2)
        SamplingParams(top_k=2, top_p=0.7),  # top-p on the renormalised top-k: 0.5/0.7 = 0.71 > 0.7 keeps one
    ]
    expected = [[True, True, False, False], [True] * 4, [True, False, False, False]]
    if with_top_p_only_row:
        params.append(SamplingParams(top_p=0.75))  # 0.5 + 0.2 < 0.75: the third is still needed
        expected.append([True, True, True, False])
    kept = Sampler._apply_top_k_top_p(probs.log().expand(len(params), 4), params).isfinite()
    assert kept.tolist() == expected


def _reference_keep_mask(logits_row, top_k, top_p):
    """Written out per row with a full sort: the top_k best, then the smallest prefix whose mass reaches top_p
    (a token is kept unless the mass strictly before it exceeds top_p); ties with the last kept value stay."""
    order = logits_row.sort(descending=True)
    values = order.values
    k = top_k if top_k > 0 else len(values)
    probs = torch.softmax(values[:k], dim=0)
    kept, mass = 0, 0.0
    for p in probs.tolist():
        if top_p < 1.0 and mass > top_p:
            break
        kept, mass = kept + 1, mass + p
    return logits_row >= values[kept - 1]


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (5, 0.6), (12, 0.9), (0, 0.75), (1, 0.3)])
def test_top_k_top_p_mask_matches_a_full_sort_reference(top_k, top_p):
    logits = random_logits(6, seed=top_k + 100)
    params = [SamplingParams(top_k=top_k, top_p=top_p)] * 6
    masked = Sampler._apply_top_k_top_p(logits.clone(), params)
    for row in range(6):
        assert torch.equal(masked[row] > float("-inf"), _reference_keep_mask(logits[row], top_k, top_p))


def test_top_p_bounded_by_top_k_never_sorts_the_vocabulary(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("full sort")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    out = Sampler()(random_logits(3), [state(top_k=4, top_p=0.8, seed=s) for s in range(3)])
    assert len(out) == 3


def test_greedy_batch_is_one_argmax_without_softmax(monkeypatch):
    logits = random_logits(5, seed=4)
    want = logits.argmax(dim=-1).tolist()
    mixed = Sampler()(logits, [state(temperature=0), state(temperature=0.7, seed=1), *[state(temperature=0)] * 3])
    def forbidden(*args, **kwargs):
        raise AssertionError("softmax on the greedy path")

    for name in ("log_softmax", "softmax"):
        monkeypatch.setattr(torch, name, forbidden)
    fast = Sampler()(logits, [state(temperature=0) for _ in range(5)])
    assert [t.token_id for t in fast] == want
    assert [mixed[i].token_id for i in (0, 2, 3, 4)] == [want[i] for i in (0, 2, 3, 4)]
    assert all(t.logprob is None and t.top_logprobs is None for t in fast)


def test_seeded_top_k_top_p_draws_follow_the_truncated_distribution():
    logits = random_logits(1, seed=21)[0]
    keep = _reference_keep_mask(logits, 6, 0.8)
    expected = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=0)
    draws = 3000
    seqs = [state(top_k=6, top_p=0.8, seed=1000 + i) for i in range(draws)]
    tokens = torch.tensor([t.token_id for t in Sampler()(logits.expand(draws, VOCAB), seqs)])
    counts = torch.bincount(tokens, minlength=VOCAB).float() / draws
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert (counts[~keep] == 0).all()
    assert ((counts - expected).abs() <= 4 * sigma + 1e-9).all()
    again = Sampler()(logits.expand(draws, VOCAB), [state(top_k=6, top_p=0.8, seed=1000 + i) for i in range(draws)])
    assert [t.token_id for t in again] == tokens.tolist()  # seeded: the same draws again


def test_logits_processors_are_the_one_per_request_hook():
    logits = random_logits(2, seed=5)
    banned = logits[0].argmax().item()

    def ban(output_ids, row):
        row[banned] = float("-inf")
        return row

    seqs = [state(temperature=0), state(temperature=0)]
    seqs[0].logits_processors.append(ban)
    out = Sampler()(logits, seqs)
    assert out[0].token_id != banned and out[0].token_id == logits[0].topk(2).indices[1].item()
    assert out[1].token_id == logits[1].argmax().item()
    assert logits[0, banned] > float("-inf")  # the caller's logits are left as they were
