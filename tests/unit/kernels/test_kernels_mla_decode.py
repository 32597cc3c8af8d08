"""The absorbed-MLA decode kernel under TRITON_INTERPRET=1 on CPU tensors against softmax attention over the
gathered latent rows: shuffled block tables, a head count that does not fill the head tile, context lengths from 1
token to the full table (so some KV splits are empty), with and without split KV."""

import pytest
import torch

mla = pytest.importorskip("deepfleet.kernels.mla_decode")
torch.set_num_threads(1)
D_LAT, D_ROPE, BLOCK = 64, 16, 16


def _reference(q, cache, tables, lens, scale):
    out = []
    for s in range(q.shape[0]):
        n = int(lens[s])
        rows = cache[tables[s, : -(-n // BLOCK)].long()].flatten(0, 1)[:n, 0]  # [n, D_LAT + D_ROPE]
        probs = torch.softmax(q[s] @ rows.T * scale, dim=-1)
        out.append(probs @ rows[:, :D_LAT])
    return torch.stack(out)


@pytest.mark.parametrize(("width", "lens"), [(5, [1, 37, 80]), (1, [16, 3])])
def test_matches_attention_over_gathered_latent(width, lens):
    g = torch.Generator().manual_seed(width)
    b, heads = len(lens), 20
    cache = torch.randn(b * width + 1, BLOCK, 1, D_LAT + D_ROPE, generator=g)
    tables = torch.randperm(b * width, generator=g).view(b, width).to(torch.int32)
    lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, heads, D_LAT + D_ROPE, generator=g)
    got = mla.mla_decode(q, cache, tables, lens, 0.1, D_LAT)
    want = _reference(q, cache, tables, lens, 0.1)
    assert got.shape == (b, heads, D_LAT)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_widths_the_kernel_cannot_run_are_refused():
    with pytest.raises(ValueError, match=r"qk_rope_head_dim=24: .* power of two"):
        mla.mla_decode(torch.zeros(1, 16, 88), torch.zeros(2, 16, 1, 88), torch.zeros(1, 1, dtype=torch.int32),
                       torch.ones(1, dtype=torch.int32), 1.0, 64)
