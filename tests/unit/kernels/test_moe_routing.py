"""The grouped top-k routing kernel (DeepSeek-V3 `noaux_tc`) under TRITON_INTERPRET=1 on CPU (compiled on CUDA): against
the plain-PyTorch reference the model runs on CPU, on random logits and biases with V3's dims (256 experts, 8
groups, 4 kept, top-8) and the tiny model's (8 experts, 2 groups, 1 kept, top-2); and against routing written out
here per token in Python, on scores with ties (the kernel's order: lower index first)."""

import math
import os

import pytest
import torch

from deepfleet.models.deepseek_v3 import route_reference

moe_routing = pytest.importorskip("deepfleet.kernels.moe_routing")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _run(logits, bias, *args):
    ids, weights = moe_routing.grouped_topk(logits.to(DEVICE), bias.to(DEVICE), *args)
    return ids.cpu(), weights.cpu()


@pytest.mark.parametrize("experts,groups,topk_group,top_k", [(256, 8, 4, 8), (8, 2, 1, 2), (64, 4, 3, 6)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("norm", [True, False])
def test_matches_reference_on_random_logits(experts, groups, topk_group, top_k, tokens, norm):
    g = torch.Generator().manual_seed(experts * 1000 + tokens * 2 + norm)
    logits = 2 * torch.randn(tokens, experts, generator=g)
    bias = 0.1 * torch.randn(experts, generator=g)  # large enough to change the choice against the raw scores
    args = (groups, topk_group, top_k, norm, 2.5)
    ids, weights = _run(logits, bias, *args)
    want_ids, want_weights = route_reference(logits, bias, *args)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)
    assert (weights - want_weights).abs().max() <= 1e-6


def _expected(scores, bias, groups, topk_group, top_k, norm, scaling):
    """One token, plain Python: sort keys (-value, index) make the lower index win a tie."""
    per = len(scores) // groups
    choice = [s + b for s, b in zip(scores, bias, strict=True)]
    group_score = [sum(sorted(choice[i * per : (i + 1) * per], reverse=True)[:2]) for i in range(groups)]
    kept = sorted(range(groups), key=lambda i: (-group_score[i], i))[:topk_group]
    candidates = [e for e in range(len(scores)) if e // per in kept]
    ids = sorted(candidates, key=lambda e: (-choice[e], e))[:top_k]
    weights = [scores[e] for e in ids]
    total = sum(weights) + 1e-20 if norm else 1.0
    return ids, [w / total * scaling for w in weights]


@pytest.mark.parametrize("experts,groups,topk_group,top_k", [(256, 8, 4, 8), (8, 2, 1, 2)])
def test_ties_go_to_the_lower_index(experts, groups, topk_group, top_k):
    g = torch.Generator().manual_seed(3)
    # logits on a coarse grid and a zero bias: many equal scores within and across groups; row 0 all equal
    logits = torch.randint(-2, 3, (16, experts), generator=g).float()
    logits[0] = 0.0
    bias = torch.zeros(experts)
    args = (groups, topk_group, top_k, True, 2.5)
    ids, weights = _run(logits, bias, *args)
    for row in range(logits.shape[0]):
        scores = [1 / (1 + math.exp(-v)) for v in logits[row].tolist()]
        want_ids, want_weights = _expected(scores, bias.tolist(), *args)
        assert ids[row].tolist() == want_ids
        assert max(abs(a - b) for a, b in zip(weights[row].tolist(), want_weights, strict=True)) <= 1e-6
    assert ids[0].tolist() == list(range(top_k))  # all equal: the first experts of the first groups


def test_refuses_bad_inputs():
    logits, bias = torch.zeros(2, 8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="float32 logits"):
        moe_routing.grouped_topk(logits.half(), bias, 2, 1, 2, True, 1.0)
    with pytest.raises(ValueError, match="cannot give top-5 from 1 groups"):
        moe_routing.grouped_topk(logits, bias, 2, 1, 5, True, 1.0)
    with pytest.raises(ValueError, match="8 experts in 3 groups"):
        moe_routing.grouped_topk(logits, bias, 3, 1, 2, True, 1.0)
