"""Programmatic dependent launch (kernels/pdl.py): off on CPU (the interpreter has no griddepcontrol); on a Hopper
GPU, a CUDA graph of many back-to-back PDL kernels, each reading what the one before wrote and writing buffers the
one before read, gives the products a float64 chain of the same steps computes (a kernel that ran ahead of its
predecessor would read a stale or half-written row, off by far more than the tolerance)."""

import pytest
import torch

from deepfleet.kernels import pdl


def test_off_on_cpu():
    assert not pdl.enabled(torch.zeros(1))
    assert pdl.launch_options(False) == {}
    assert pdl.launch_options(True) == {"launch_pdl": True}


@pytest.mark.gpu
def test_dependent_chain_in_a_graph_matches_float64():
    from deepfleet.kernels.gemv import gemv, gemv_add_norm
    from deepfleet.kernels.rms_norm import rms_norm

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0 (Hopper) or later")
    g = torch.Generator().manual_seed(0)
    k, layers = 1024, 12
    ws = [torch.randn(k, k, generator=g) / k**0.5 for _ in range(layers)]
    ups = [torch.randn(2 * k, k, generator=g) / k**0.5 for _ in range(layers)]
    norm_w = torch.rand(k, generator=g) + 0.5
    x0 = torch.randn(1, k, generator=g)

    def expected():
        x, res = x0.double(), torch.zeros(1, k, dtype=torch.float64)
        for w, up in zip(ws, ups, strict=True):
            res = x @ w.double().T + res  # O projection + residual, then the norm
            x = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w.double()
            gate, u = (x @ up.double().T).chunk(2, dim=-1)
            x = torch.nn.functional.silu(gate) * u
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w.double()
        return x

    cw = [w.cuda() for w in ws]
    cu = [u.cuda() for u in ups]
    cn, cx = norm_w.cuda(), x0.cuda()

    def chain():
        x, res = cx, torch.zeros_like(cx)
        for w, up in zip(cw, cu, strict=True):
            x, res = gemv_add_norm(x, w, None, res, cn, 1e-6, (16, 128, 8, 4))  # split-K: partials and counters
            x = rms_norm(gemv(x, up, silu_mul=True, tiles=(4, 512, 4, 1)), cn, 1e-6)
        return x

    out = chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    ref = expected()
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        err = (out.double().cpu() - ref).abs().max().item()
        assert err < 1e-3 * ref.abs().max().item(), f"max error {err}"
