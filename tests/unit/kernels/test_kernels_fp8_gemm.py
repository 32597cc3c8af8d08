"""The block-FP8 GEMM kernels under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py), against the
dequantize-then-matmul reference: the weight-streaming path (few rows, K split across programs), the FP8×FP8 path
(per-token 1×128 activation groups), partial blocks in N and K, bias, and the activation quantizer against its
plain definition."""

import pytest
import torch

from deepfleet.quant.fp8 import dequantize, quantize

fp8_gemm = pytest.importorskip("deepfleet.kernels.fp8_gemm")
torch.set_num_threads(1)
BLOCK = (128, 128)


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) / k**0.5, BLOCK)


def _rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize(("m", "n", "k"), [(1, 192, 512), (5, 64, 200)])
def test_streaming_path_matches_reference(m, n, k):
    w, s = _weights(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    got = fp8_gemm.fp8_matmul(x, w, s, BLOCK, bias)
    want = x @ dequantize(w, s, BLOCK).T + bias
    assert _rel_err(got, want) < 1e-5


def test_activation_groups_are_quantized_to_e4m3():
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(4)) * 7
    q, s = fp8_gemm.quantize_activations(x, 128)
    for row in range(3):
        for g, (lo, hi) in enumerate([(0, 128), (128, 200)]):
            scale = x[row, lo:hi].abs().max() / 448  # the group's largest |x| lands on e4m3's largest value
            assert torch.allclose(s[row, g], scale)
            want = (x[row, lo:hi] / scale).to(torch.float8_e4m3fn)  # round to nearest even, as the GPU does
            assert torch.equal(q[row, lo:hi].view(torch.uint8), want.view(torch.uint8))


def test_fp8_tensor_core_path_matches_reference():
    m, n, k = 72, 160, 256  # > 64 rows: activations quantized 1x128, FP8 x FP8
    w, s = _weights(n, k, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    got = fp8_gemm.fp8_matmul(x, w, s, BLOCK)
    xq, xs = quantize(x, (1, 128))
    want = dequantize(xq, xs, (1, 128)) @ dequantize(w, s, BLOCK).T
    assert _rel_err(got, want) < 1e-5
    # and close to the unquantized-activation product: what per-token-group quantization costs
    assert _rel_err(got, x @ dequantize(w, s, BLOCK).T) < 0.05


def test_block_sizes_the_kernels_cannot_run_are_refused():
    w, s = _weights(128, 128)
    with pytest.raises(ValueError, match=r"weight_block_size \[128, 96\]: .* power-of-two K block"):
        fp8_gemm.fp8_matmul(torch.randn(1, 128), w, s, (128, 96))
