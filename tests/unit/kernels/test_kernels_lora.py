"""The batched LoRA kernels (shrink, expand) under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py),
against a per-token loop of plain matmuls written here: tokens of several adapters and of none ("null" slot) in
one call, one shard (o_proj) and three fused shards of different sizes (q/k/v), ranks padded to the slot's."""

import pytest
import torch

from deepfleet.kernels.lora_ops import lora_add_reference

lora = pytest.importorskip("deepfleet.kernels.lora")
torch.set_num_threads(1)


def _case(shards, k, rank, slots_per_token, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_slots = 4  # 3 adapters + the null slot
    a = torch.randn(n_slots, len(shards) * rank, k, generator=g)
    b = torch.randn(n_slots, sum(shards), rank, generator=g)
    a[-1], b[-1] = 0, 0  # the null slot holds zeros, as the adapter slots keep it
    x = torch.randn(len(slots_per_token), k, generator=g)
    y = torch.randn(len(slots_per_token), sum(shards), generator=g)
    slots = torch.tensor(slots_per_token, dtype=torch.long)
    offsets = [sum(shards[:i]) for i in range(len(shards))]
    return y, x, a, b, slots, offsets


def _expected(y, x, a, b, slots, offsets):
    """Per token: for each shard j, y[off_j : off_j + size_j] += B_j (A_j x), with A_j the j-th rank block."""
    rank = b.shape[2]
    out = y.clone()
    ends = [*offsets[1:], b.shape[1]]
    for t, s in enumerate(slots.tolist()):
        if s == a.shape[0] - 1:
            continue
        for j, (lo, hi) in enumerate(zip(offsets, ends, strict=True)):
            h = a[s, j * rank : (j + 1) * rank] @ x[t]
            out[t, lo:hi] += b[s, lo:hi] @ h
    return out


@pytest.mark.parametrize(("shards", "k", "rank"), [([48], 200, 8), ([64, 16, 16], 64, 16), ([40, 40], 130, 4)])
def test_kernels_match_per_token_matmuls(shards, k, rank):
    y, x, a, b, slots, offsets = _case(shards, k, rank, [0, 3, 1, 1, 2, 3, 0])
    want = _expected(y, x, a, b, slots, offsets)
    got = lora.lora_add(y.clone(), x, a, b, slots, offsets)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    ref = lora_add_reference(y.clone(), x, a, b, slots, offsets)
    assert torch.allclose(ref, want, atol=1e-4, rtol=1e-4)


def test_null_slot_tokens_are_left_as_they_are():
    y, x, a, b, slots, offsets = _case([32], 64, 8, [3, 3, 3])
    a[-1], b[-1] = 1.0, 1.0  # the kernels must not even read the null slot
    assert torch.equal(lora.lora_add(y.clone(), x, a, b, slots, offsets), y)
