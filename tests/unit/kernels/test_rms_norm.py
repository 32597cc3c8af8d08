"""The fused residual-add + RMSNorm kernel against RMSNorm written out here in float64, on random rows: hidden sizes
that are and are not powers of two, rows with a stride larger than their width (a split view), with and without
the residual. Under Triton's interpreter on CPU without a GPU (tests/conftest.py), compiled on CUDA otherwise."""

import os

import pytest
import torch

from deepfleet.kernels.rms_norm import rms_norm

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
EPS = 1e-6


def _expected(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 100), (3, 1536)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_float64_rms_norm(dtype, rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows * hidden + with_residual)
    # rows of a wider tensor: the kernel must follow the row stride, not assume contiguous rows
    x = (3 * torch.randn(rows, hidden + 24, generator=g)).to(dtype)[:, 8 : 8 + hidden]
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
    args = [t.to(DEVICE) for t in (x, weight)]
    if with_residual:
        out, new_residual = rms_norm(args[0], args[1], EPS, residual.to(DEVICE))
        # the sum is the dtype's rounding of the exact sum, which is what the dtype's own addition gives
        assert torch.equal(new_residual.cpu(), (x.double() + residual.double()).to(dtype))
        expected = _expected(new_residual.cpu(), weight)
    else:
        out = rms_norm(args[0], args[1], EPS)
        expected = _expected(x, weight)
    assert out.dtype == dtype and out.shape == (rows, hidden)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # float16: the normalised row and the product are rounded
    err = (out.cpu().double() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max error {err}"


def test_refuses_mismatched_inputs():
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="rms_norm: expected x"):
        rms_norm(x, torch.ones(16, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(32, device=DEVICE), EPS, torch.randn(3, 32, device=DEVICE))
