"""The batch-1 GEMV kernel against the products written out here in float64: plain, split over K (slices that do
and do not divide K, a last slice shorter than the others, more splits asked than K has tiles), SiLU·mul fused
into the gate_up epilogue, feature counts that are not multiples of the row
block, with and without bias; the residual add + RMSNorm epilogue against the unfused reference (the product rounded,
then models/layers.py's RMSNorm). A split or normalising launch runs twice to check that its counters are left at
zero for the next.
Under Triton's interpreter on CPU without a GPU (tests/conftest.py), compiled on CUDA otherwise."""

import os

import pytest
import torch

from deepfleet.kernels.gemv import gemv, gemv_add_norm
from deepfleet.models.layers import _rms_norm_ref

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytestmark = pytest.mark.usefixtures("interpreter_scalar_index")  # the K loop's bounds are runtime values


def _tensors(n_rows, k, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype)
    w = (torch.randn(n_rows, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n_rows, generator=g).to(dtype) if bias else None
    return x, w, b


def _run(x, w, b, **kw):
    return gemv(x.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE), **kw).cpu()


def _check(out, expected, dtype, fused=False):
    assert out.dtype == dtype and out.shape == expected.shape
    tol = 1e-5 if dtype == torch.float32 else (4e-3 if fused else 2e-3)
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max error {err}"


# (BLOCK_N, BLOCK_K, num_warps, SPLIT_K)
@pytest.mark.parametrize("n,k,tiles", [(40, 100, (4, 16, 1, 1)), (7, 300, (8, 32, 2, 1)), (37, 300, (4, 32, 1, 4)),
                                       (33, 256, (2, 32, 1, 8)), (5, 70, (4, 64, 1, 4))])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_product(n, k, tiles, bias, dtype):
    x, w, b = _tensors(n, k, bias, dtype, seed=n * k + bias)
    expected = x.double() @ w.double().T + (0 if b is None else b.double())
    for _ in range(2):  # (split launches: the second finds the counters the first left)
        _check(_run(x, w, b, tiles=tiles), expected, dtype)


@pytest.mark.parametrize("n,k,bias,tiles", [(24, 100, False, (4, 16, 1, 1)), (33, 200, True, (8, 64, 2, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_epilogue(n, k, bias, tiles, dtype):
    x, w, b = _tensors(2 * n, k, bias, dtype, seed=k + n)
    full = x.double() @ w.double().T + (0 if b is None else b.double())
    # the gate and up products are rounded to the dtype (as the unfused GEMM's output), then SiLU·mul
    gate, up = full.to(dtype).double().chunk(2, dim=-1)
    _check(_run(x, w, b, silu_mul=True, tiles=tiles), gate * torch.sigmoid(gate) * up, dtype, fused=True)


@pytest.mark.parametrize("n,k,tiles", [(40, 100, (4, 16, 1, 1)), (37, 300, (4, 32, 1, 4)), (33, 256, (2, 32, 1, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_norm_epilogue(n, k, tiles, dtype):
    x, w, b = _tensors(n, k, n % 2 == 1, dtype, seed=3 * n + k)
    g = torch.Generator().manual_seed(n)
    residual, weight = torch.randn(1, n, generator=g).to(dtype), (1 + torch.rand(n, generator=g)).to(dtype)
    # the unfused path: the product rounded to the dtype (the GEMM's output), then the residual RMSNorm
    y = (x.double() @ w.double().T + (0 if b is None else b.double())).to(dtype)
    summed = y + residual
    normed = _rms_norm_ref(summed, weight, 1e-6)
    dev = [t.to(DEVICE) for t in (x, w, residual, weight)]
    for _ in range(2):  # the second launch finds the arrival counters the first left
        out, out_sum = gemv_add_norm(dev[0], dev[1], None if b is None else b.to(DEVICE), dev[2], dev[3], 1e-6,
                                     tiles=tiles)
        _check(out_sum.cpu(), summed.double(), dtype)
        _check(out.cpu(), normed.double(), dtype)
        # a plain launch between two normalising ones shares none of their state
        _check(_run(x, w, b, tiles=tiles), y.double(), dtype)


def test_default_tiles():
    x, w, b = _tensors(9, 1100, True, torch.float32, seed=1)
    _check(_run(x, w, b), x.double() @ w.double().T + b.double(), torch.float32)


def test_refuses_more_than_one_row_and_mismatched_shapes():
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="do not fit"):
        gemv(torch.randn(1, 12, device=DEVICE), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 16, device=DEVICE), w, torch.randn(4, device=DEVICE))
    with pytest.raises(ValueError, match="SPLIT_K 1"):
        gemv(torch.randn(1, 16, device=DEVICE), w, silu_mul=True, tiles=(2, 16, 1, 2))
    with pytest.raises(ValueError, match="norm weight"):
        gemv_add_norm(torch.randn(1, 16, device=DEVICE), w, None, torch.randn(1, 4, device=DEVICE),
                      torch.randn(8, device=DEVICE), 1e-6)
