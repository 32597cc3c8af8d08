"""The SiLU·mul kernel against silu(gate) * up written out here in float64 with the dtype's two roundings (silu,
then the product), on random rows: widths inside one column block and across several with a masked tail, rows of
a wider tensor (a row stride beyond the width), a leading batch shape, float32 and float16. Under Triton's
interpreter on CPU without a GPU (tests/conftest.py), compiled on CUDA otherwise."""

import os

import pytest
import torch

from deepfleet.kernels.silu_mul import silu_mul

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _expected(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    gate, up = x[..., :n].double(), x[..., n:].double()
    act = (gate / (1 + torch.exp(-gate))).to(x.dtype).double()  # silu in the dtype, as F.silu returns it
    return act * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n,config", [(1, 64, None), (3, 200, None), (4, 600, (256, 2))])
def test_matches_float64_silu_mul(dtype, rows, n, config):
    g = torch.Generator().manual_seed(rows * n)
    # rows of a wider tensor: the kernel must follow the row stride, not assume contiguous rows
    x = (4 * torch.randn(rows, 2 * n + 16, generator=g)).to(dtype)[:, 8 : 8 + 2 * n]
    out = silu_mul(x.to(DEVICE), config).cpu()
    expected = _expected(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    # float16: the product's rounding (and silu's, where the exponential's last bit flips it) is within 2 ulps
    tol = 1e-6 if dtype == torch.float32 else 2 * 2**-10
    err = ((out.double() - expected).abs() / expected.abs().clamp_min(2**-14)).max().item()
    assert err <= tol, f"max relative error {err}"


def test_keeps_leading_dims():
    x = torch.randn(2, 3, 2 * 40)
    out = silu_mul(x.to(DEVICE)).cpu()
    assert out.shape == (2, 3, 40)
    assert torch.allclose(out.double(), _expected(x), rtol=1e-6, atol=1e-7)


def test_refuses_odd_width():
    with pytest.raises(ValueError, match="silu_mul: expected"):
        silu_mul(torch.randn(2, 33, device=DEVICE))
