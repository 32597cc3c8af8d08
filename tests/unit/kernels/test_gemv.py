"""The batch-1 GEMV kernel (and its fused SiLU·mul epilogue) against the products written out here in float64:
feature counts that are and are not powers of two and not multiples of the tiles, K longer than one tile (the
loop), with and without bias, the default and explicit tiles. Under Triton's interpreter on CPU without a GPU
(tests/conftest.py), compiled on CUDA otherwise."""

import os

import pytest
import torch

from deepfleet.kernels import gemv as gemv_module
from deepfleet.kernels.gemv import gemv

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = pytest.mark.usefixtures("interpreter_scalar_index")  # the K loop's bound is a runtime value


def _tensors(n_rows, k, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype)
    w = (torch.randn(n_rows, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n_rows, generator=g).to(dtype) if bias else None
    return x, w, b


def _run(x, w, b, **kw):
    return gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), **kw).cpu()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 products: K of 100-300 then spans several loop iterations, as the real K do at 8192."""
    monkeypatch.setattr(gemv_module, "_TILE_ELEMENTS", 64)


@pytest.mark.parametrize("n,k", [(40, 100), (64, 256), (7, 300)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_product(n, k, bias, dtype, small_tiles):
    x, w, b = _tensors(n, k, bias, dtype, seed=n * k + bias)
    out = _run(x, w, b)
    expected = x.double() @ w.double().T + (0 if b is None else b.double())
    assert out.shape == (1, n) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max error {err}"


@pytest.mark.parametrize("n,k,bias", [(24, 100, False), (33, 200, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_silu_mul(n, k, bias, dtype, small_tiles):
    x, w, b = _tensors(2 * n, k, bias, dtype, seed=k + n)
    out = _run(x, w, b, silu_mul=True)
    full = x.double() @ w.double().T + (0 if b is None else b.double())
    # the gate and up products are rounded to the dtype (as the unfused GEMM's output), then SiLU·mul
    gate, up = full.to(dtype).double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    assert out.shape == (1, n) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max error {err}"


@pytest.mark.parametrize("tiles", [(1, 16, 1), (4, 32, 2), (8, 128, 4)])
def test_explicit_tiles(tiles):
    x, w, b = _tensors(2 * 21, 70, True, torch.float32, seed=sum(tiles))
    out = _run(x, w, b, silu_mul=True, tiles=tiles)
    full = x.double() @ w.double().T + b.double()
    gate, up = full.float().double().chunk(2, dim=-1)
    expected = gate * torch.sigmoid(gate) * up
    assert (out.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_refuses_more_than_one_row_and_mismatched_shapes():
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="do not fit"):
        gemv(torch.randn(1, 12, device=DEVICE), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 16, device=DEVICE), w, torch.randn(4, device=DEVICE))
