"""The fused MoE under TRITON_INTERPRET=1 on CPU tensors: the device-side sort/align by expert (every assignment
once, tiles of one expert, padding masked, sizes fixed by the shapes; the one-program align kernel equal to the
tensor-ops version on random routings) and the grouped GEMMs against the per-expert
reference loop, with unquantized and block-FP8 experts (weight-streaming and FP8×FP8 activation paths)."""

import os

import pytest
import torch

from deepfleet.models.deepseek_v3 import experts_reference
from deepfleet.quant.fp8 import dequantize, quantize

fused_moe = pytest.importorskip("deepfleet.kernels.fused_moe")
torch.set_num_threads(1)
E, H, INNER = 4, 128, 128
# the align kernel's tests also run compiled on a GPU host (its inputs moved there); the GEMM tests are CPU-only
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _align_on_device(ids, *args):
    return tuple(t.cpu() for t in fused_moe.align_kernel(ids.to(DEVICE), *args))


def _routing(t, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    return ids, weights


def _experts(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * INNER, H, generator=g) / H**0.5, torch.randn(E, H, INNER, generator=g) / INNER**0.5


@pytest.mark.parametrize("align", [fused_moe.align_reference, _align_on_device])
def test_align_by_expert_covers_every_assignment_once(align):
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 1]])  # expert 2 four times, 0 twice, 1 and 3 once
    row_ids, tile_expert, rows_used = align(ids, E, 4)
    n = ids.numel()
    assert row_ids.numel() == 8 + 4 * 3 == 20  # 8 assignments + at most 3 padding rows for each of 4 experts
    assert int(rows_used) == 4 + 4 + 4 + 4  # each expert's run padded to a 4-row tile
    used = row_ids[: int(rows_used)]
    assert sorted(used[used < n].tolist()) == list(range(n))
    flat = ids.flatten()
    for tile in range(int(rows_used) // 4):
        rows = row_ids[tile * 4 : tile * 4 + 4]
        real = rows[rows < n]
        assert (flat[real.long()] == tile_expert[tile]).all()
    assert tile_expert.tolist()[:4] == [0, 1, 2, 3]


def test_slots_of_experts_on_other_ranks_sort_past_the_work_and_add_nothing():
    # expert parallelism: the id E marks a slot whose expert another rank holds
    ids = torch.tensor([[2, E], [E, 3], [0, E]])
    row_ids, tile_expert, rows_used = fused_moe.align_by_expert(ids, E, 4, skip_remote=True)
    assert int(rows_used) == 3 * 4  # experts 0, 2, 3: one 4-row tile each; the three remote slots: none
    used = row_ids[: int(rows_used)]
    assert sorted(used[used < ids.numel()].tolist()) == [0, 3, 4]  # the flat positions of the local slots
    assert tile_expert.tolist()[:3] == [0, 2, 3]
    w13, w2 = _experts(2)
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(4))
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(5))
    got = fused_moe.fused_experts(x, w13, w2, ids, weights, skip_remote=True)
    remote = ids == E  # the same slots as weight-0 slots on expert 0: they add exactly nothing
    want = experts_reference(x, w13, w2, ids.masked_fill(remote, 0), weights.masked_fill(remote, 0))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("t", [3, 40])
def test_unquantized_experts_match_reference(t):
    w13, w2 = _experts(0)
    ids, weights = _routing(t, 2, seed=t)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(9))
    got = fused_moe.fused_experts(x, w13, w2, ids, weights)
    want = experts_reference(x, w13, w2, ids, weights)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("t", [3, 40])  # 6 assignments: weight streaming; 80 (> 64): FP8 activations
def test_fp8_experts_match_reference(t):
    block = (128, 128)
    w13, w2 = _experts(1)
    q13, s13 = zip(*(quantize(w, block) for w in w13), strict=True)
    q2, s2 = zip(*(quantize(w, block) for w in w2), strict=True)
    q13, s13, q2, s2 = (torch.stack(v) for v in (q13, s13, q2, s2))
    ids, weights = _routing(t, 2, seed=t + 1)
    x = torch.randn(t, H, generator=torch.Generator().manual_seed(10))
    got = fused_moe.fused_experts(x, q13, q2, ids, weights, s13, s2, block)
    want = experts_reference(x, dequantize(q13, s13, block), dequantize(q2, s2, block), ids, weights)
    # streaming keeps activations exact; 1x128 FP8 activations cost ~2-3% (e4m3 has 3 mantissa bits)
    tol = 1e-5 if t * 2 <= 64 else 0.05
    assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("experts,t,k", [(256, 1, 8), (256, 7, 8), (256, 128, 8), (8, 5, 2), (4, 3, 2)])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("skip_remote", [False, True])
def test_align_kernel_equals_the_tensor_ops(experts, t, k, block_m, skip_remote):
    g = torch.Generator().manual_seed(experts + t * k + block_m)
    if experts >= k:  # distinct experts per token, as routing gives
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)])
    else:
        ids = torch.randint(0, experts, (t, k), generator=g)
    if skip_remote:  # about a third of the slots on another rank's experts: the id `experts`
        ids = ids.masked_fill(torch.rand(t, k, generator=g) < 0.3, experts)
    want = fused_moe.align_reference(ids, experts, block_m, skip_remote)
    for ids_dtype in (torch.int32, torch.int64):
        got = _align_on_device(ids.to(ids_dtype), experts, block_m, skip_remote)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == torch.int32 and torch.equal(a, b)


def test_align_kernel_on_skewed_and_empty_batches():
    # every slot on two experts (runs longer than a tile), and no tokens at all
    ids = torch.tensor([[3, 1]] * 40)
    for got, want in zip(_align_on_device(ids, E, 16), fused_moe.align_reference(ids, E, 16), strict=True):
        assert torch.equal(got, want)
    row_ids, tile_expert, rows_used = _align_on_device(torch.zeros(0, 2, dtype=torch.long), E, 16)
    assert row_ids.numel() == 0 and tile_expert.numel() == 0 and int(rows_used) == 0
