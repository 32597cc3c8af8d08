"""The one-token MoE kernels (kernels/moe_decode.py) under TRITON_INTERPRET=1 on CPU tensors, against sums written
here from dequantized weights: every candidate tile (FMA and FP8 tensor-core forms), the shared expert as the
extra slot, a slot routed to another rank's expert adding nothing, unquantized experts."""

import pytest
import torch
import torch.nn.functional as F

from deepfleet.quant.fp8 import dequantize, quantize

moe_decode = pytest.importorskip("deepfleet.kernels.moe_decode")
torch.set_num_threads(1)
BLOCK = (128, 128)
E, H, INNER = 4, 256, 128  # two K blocks of the gate_up weight, one of the down weight


def _stack(weights):
    q, s = zip(*(quantize(w, BLOCK) for w in weights), strict=True)
    return torch.stack(q), torch.stack(s)


def _fp8_experts(seed):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E + 1, 2 * INNER, H, generator=g) / H**0.5  # (the last one: the shared expert)
    w2 = torch.randn(E + 1, H, INNER, generator=g) / INNER**0.5
    return _stack(w13), _stack(w2)


def _one_by_128(v):
    """v [1, K] rounded as the tensor-core form feeds it: e4m3 per group of 128 with its scale."""
    return dequantize(*quantize(v, (1, 128)), (1, 128))


def _expected(x, w13, w2, slots, quantize_inputs):
    """Σ over (expert, weight) slots of weight · down(silu(gate x) · up x), weights dequantized."""
    out = torch.zeros(1, H)
    for gate_up, down, weight in slots:
        xin = _one_by_128(x) if quantize_inputs[0] else x
        gate, up = F.linear(xin, gate_up).chunk(2, dim=-1)
        act = F.silu(gate) * up
        out += weight * F.linear(_one_by_128(act) if quantize_inputs[1] else act, down)
    return out


@pytest.mark.parametrize("tiles", moe_decode.CANDIDATE_TILES)
def test_every_candidate_matches_the_dequantized_sum_with_the_shared_expert(tiles):
    (q13, s13), (q2, s2) = _fp8_experts(0)
    d13, d2 = dequantize(q13, s13, BLOCK), dequantize(q2, s2, BLOCK)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[3, 1]], dtype=torch.int32)
    weights = torch.tensor([[0.7, 1.9]])
    assert moe_decode.fits(tiles, q13[:E], q2[:E], BLOCK)
    got = moe_decode.moe_decode(x, q13[:E], s13[:E], q2[:E], s2[:E], ids, weights, BLOCK, tiles,
                                shared=(q13[E], s13[E], q2[E], s2[E]))
    want = _expected(x, d13, d2, [(d13[3], d2[3], 0.7), (d13[1], d2[1], 1.9), (d13[E], d2[E], 1.0)],
                     (tiles[0], tiles[3]))
    # FMA: float32 sums in another order; tensor cores: the same e4m3 inputs, an activation rounded near a step
    # of e4m3 may land on the other side of it. A wrong expert, scale or lost slot is off by O(1).
    tolerance = 2e-2 if tiles[0] or tiles[3] else 1e-5
    assert ((got - want).abs().max() / want.abs().max()).item() < tolerance


def test_a_slot_on_another_rank_adds_nothing_and_no_shared_expert():
    (q13, s13), (q2, s2) = _fp8_experts(2)
    d13, d2 = dequantize(q13, s13, BLOCK), dequantize(q2, s2, BLOCK)
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(3))
    tiles = next(t for t in moe_decode.CANDIDATE_TILES if not t[0] and not t[3])
    ids = torch.tensor([[E, 2]], dtype=torch.int32)  # E: held by another rank
    got = moe_decode.moe_decode(x, q13[:E], s13[:E], q2[:E], s2[:E], ids, torch.tensor([[5.0, 0.5]]), BLOCK,
                                tiles)
    want = _expected(x, d13, d2, [(d13[2], d2[2], 0.5)], (False, False))
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_unquantized_experts_take_the_fma_form_only():
    g = torch.Generator().manual_seed(4)
    h, inner = 64, 32  # the tiny test model's sizes: K shorter than a tile
    w13 = torch.randn(E + 1, 2 * inner, h, generator=g)
    w2 = torch.randn(E + 1, h, inner, generator=g)
    usable = [t for t in moe_decode.CANDIDATE_TILES if moe_decode.fits(t, w13[:E], w2[:E], None)]
    assert usable and all(not t[0] and not t[3] for t in usable)
    x = torch.randn(1, h, generator=g)
    ids = torch.tensor([[0, 2]], dtype=torch.int32)
    got = moe_decode.moe_decode(x, w13[:E], None, w2[:E], None, ids, torch.tensor([[0.25, 2.0]]), None, usable[0],
                                shared=(w13[E], None, w2[E], None))
    want = torch.zeros(1, h)
    for e, weight in ((0, 0.25), (2, 2.0), (E, 1.0)):
        gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)
        want += weight * F.linear(F.silu(gate) * up, w2[e])
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.fixture(scope="module")
def tiny_fp8_moe(tmp_path_factory):
    from deepfleet.models.config import load_config
    from deepfleet.models.loader import load_model
    from deepfleet.models.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "ds_fp8", "deepseek_v3", fp8=True)
    model = load_model(load_config(model_dir), torch.float32, torch.device("cpu"), 256)
    return model


def test_start_up_timing_finds_exactly_the_moe_layers(tiny_fp8_moe):
    """choose_gemv's one-row paths: the MoE layers (layer 0 is dense; the routed experts inside are no site)."""
    from deepfleet.models.deepseek_v3 import MoE
    from deepfleet.models.layers import one_row_sites

    sites = one_row_sites(tiny_fp8_moe)
    moes = [m for m in tiny_fp8_moe.modules() if isinstance(m, MoE)]
    assert list(sites) == [(MoE, 256)] and sites[(MoE, 256)] == moes and len(moes) == 2


def test_the_moe_layer_routes_one_row_through_the_decode_kernels_with_its_shared_expert(tiny_fp8_moe):
    """Experts.decode (what MoE.forward takes for one CUDA row at the chosen tiles) against the layer's own
    reference path: the routed experts' per-expert loop plus the shared expert, both on dequantized weights, with
    unrounded activations: the FMA form to float32 rounding, the tensor-core form to its e4m3 rounding of x and of
    the activation (~5% of the largest output here; the exact check is the tile tests above)."""
    moe = tiny_fp8_moe.model.layers[1].mlp  # (layer 0 is dense)
    x = torch.randn(1, moe.in_features, generator=torch.Generator().manual_seed(5))
    ids, weights = moe.route(x)
    want = moe.experts(x, ids, weights) + moe.shared_experts(x)
    candidates = moe.one_row_candidates()
    assert moe.experts._as_slot(moe.shared_experts) is not None  # the shared expert rides along as a slot
    for tiles in (next(t for t in candidates if not t[0] and not t[3]), next(t for t in candidates if t[0])):
        got = moe.experts.decode(x, ids, weights, moe.shared_experts, tiles)
        assert ((got - want).abs().max() / want.abs().max()).item() < (0.1 if tiles[0] else 1e-5)
