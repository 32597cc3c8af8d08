"""MLA's glue kernel (kernels/mla_rope_cache.py) under TRITON_INTERPRET=1 on CPU tensors against the plain-PyTorch
steps of models/deepseek_v3.py's MLAttention: the absorbed query (q_nope · W_UK | rotated q_rope), and the cache
row of each token ([RMSNorm(latent) | rotated rope key]) in its slot, other slots untouched; both rope layouts."""

import pytest
import torch

from deepfleet.models.layers import RotaryEmbedding, _rms_norm_ref

mla_rope_cache = pytest.importorskip("deepfleet.kernels.mla_rope_cache")
torch.set_num_threads(1)
HEADS, NOPE, ROPE, LORA, BS = 3, 16, 8, 32, 4


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("t", [1, 70])  # 70: two 64-token tiles, the second partial
def test_matches_the_torch_steps(interleaved, t):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(t, HEADS, NOPE + ROPE, generator=g)
    w_kv = torch.randn(HEADS, NOPE + 16, LORA, generator=g)  # [heads, nope + v, kv_lora]: W_UK is a strided view
    w_uk = w_kv[:, :NOPE]
    kv = torch.randn(t, LORA + ROPE, generator=g)
    norm_w = torch.rand(LORA, generator=g) + 0.5
    rotary = RotaryEmbedding(ROPE, 64, 10000.0, None, interleaved=interleaved)
    positions = torch.randint(0, 64, (t,), generator=g)
    cos, sin = rotary.lookup(positions, torch.float32)
    blocks = t // BS + 3
    slots = torch.randperm(blocks * BS, generator=g)[:t]
    cache = torch.full((blocks, BS, 1, LORA + ROPE), 7.0)

    query = mla_rope_cache.mla_rope_cache(q, w_uk, kv, norm_w, 1e-6, cos, sin, cache, slots, interleaved)

    q_nope, q_rope = q.split([NOPE, ROPE], dim=-1)
    latent, k_rope = kv.split([LORA, ROPE], dim=-1)
    q_rope, k_rope = rotary((cos, sin), q_rope, k_rope.view(t, 1, ROPE))
    want_query = torch.cat([torch.einsum("thn,hnc->thc", q_nope, w_uk), q_rope], dim=-1)
    torch.testing.assert_close(query, want_query, rtol=1e-5, atol=1e-5)
    flat = cache.view(-1, LORA + ROPE)
    want_rows = torch.cat([_rms_norm_ref(latent, norm_w, 1e-6), k_rope[:, 0]], dim=-1)
    torch.testing.assert_close(flat[slots], want_rows, rtol=1e-5, atol=1e-5)
    others = torch.ones(flat.shape[0], dtype=torch.bool)
    others[slots] = False
    assert (flat[others] == 7.0).all()
