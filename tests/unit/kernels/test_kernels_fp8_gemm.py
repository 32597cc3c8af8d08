"""The block-FP8 GEMM kernels under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py), against the
dequantize-then-matmul reference: the weight-streaming kernel (few rows, K split across programs or not), the
FP8×FP8 kernel (per-token 1×128 activation groups), partial blocks in N and K, bias, the activation quantizer
against its plain definition, the one-row W8A16 GEMV (split K reduced in the launch), every tile choice of the
measured tables, and how a table entry is picked."""

import json

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


STREAM = dict(kernel="stream", BN=32, num_warps=4, num_stages=2)


@pytest.mark.parametrize(("m", "n", "k", "cfg"), [
    (1, 192, 512, None),  # the default choice for one row
    (3, 160, 600, {**STREAM, "SPLIT": 2}),  # partial K step (600 = 4 x 128 + 88), two splits, partial rows
    (5, 64, 200, None),
    (9, 96, 384, {**STREAM, "SPLIT": 3}),
    (9, 96, 384, {**STREAM, "SPLIT": 1}),
])
def test_streaming_kernels_match_reference(m, n, k, cfg):
    w, s = _weights(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    got = fp8_gemm.fp8_matmul(x, w, s, BLOCK, bias, config=cfg)
    want = x @ dequantize(w, s, BLOCK).T + bias
    assert _rel_err(got, want) < 1e-5


GEMV = dict(kernel="gemv", num_warps=4)


@pytest.mark.parametrize(("n", "k", "cfg"), [
    (192, 512, {**GEMV, "BN": 4, "BK": 256, "SPLIT": 1}),
    (130, 600, {**GEMV, "BN": 8, "BK": 128, "SPLIT": 3}),  # partial N (130) and K (600) blocks, three splits
    (136, 384, {**GEMV, "BN": 2, "BK": 256, "SPLIT": 2}),  # one K step spans two scale blocks
])
def test_one_row_gemv_matches_reference_and_resets_its_counters(n, k, cfg):
    w, s = _weights(n, k)
    s = _distinct_scales(s)  # distinct scale per block
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    want = x @ dequantize(w, s, BLOCK).T + bias
    for _ in range(2):  # the second launch finds the split counters zeroed by the first
        assert _rel_err(fp8_gemm.fp8_matmul(x, w, s, BLOCK, bias, config=cfg), want) < 1e-5


def test_one_row_gemv_takes_one_row_only():
    w, s = _weights(64, 256)
    with pytest.raises(ValueError, match="cannot run 2 rows"):
        fp8_gemm.fp8_matmul(torch.randn(2, 256), w, s, BLOCK, config={**GEMV, "BN": 4, "BK": 256})


def _distinct_scales(s, seed=3):
    return s * torch.rand(s.shape, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("tiles", [(4, 128, 4, 1), (8, 256, 4, 1)])  # K steps inside one scale block; over two
def test_one_row_gemv_with_silu_mul_matches_reference(tiles):
    """gate = rows [0, 128), up = rows [128, 256): each half has its own row of block scales (distinct per block),
    K = 600 ends in a partial step; silu(gate)·up of the dequantized products, bias on both halves."""
    w, s = _weights(256, 600)
    s = _distinct_scales(s)
    x = torch.randn(1, 600, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(256, generator=torch.Generator().manual_seed(2))
    gate_up = x @ dequantize(w, s, BLOCK).T + bias
    want = torch.nn.functional.silu(gate_up[:, :128]) * gate_up[:, 128:]
    got = fp8_gemm.gemv_silu_mul(x, w, s, BLOCK, bias, fp8_gemm.gemv_config(tiles))
    assert got.shape == (1, 128) and _rel_err(got, want) < 1e-5


def test_one_row_gemv_with_silu_mul_refuses_split_k():
    w, s = _weights(256, 512)
    with pytest.raises(ValueError, match="one K split"):
        fp8_gemm.gemv_silu_mul(torch.randn(1, 512), w, s, BLOCK, None, fp8_gemm.gemv_config((4, 128, 4, 2)))


@pytest.mark.parametrize("tiles", [(8, 128, 4, 3), (4, 256, 4, 1)])
def test_one_row_gemv_with_add_norm_matches_reference_and_resets_its_counters(tiles):
    """(rmsnorm(x·Wᵀ + b + residual)·weight, x·Wᵀ + b + residual) over N = 136 (a partial row block), split K and
    not; a second launch finds the split and norm counters zeroed by the first."""
    n, k, eps = 136, 600, 1e-6
    w, s = _weights(n, k)
    s = _distinct_scales(s)
    g = torch.Generator().manual_seed(5)
    x, residual, bias = torch.randn(1, k, generator=g), torch.randn(1, n, generator=g), torch.randn(n, generator=g)
    norm_weight = 1 + torch.rand(n, generator=g)
    summed = x @ dequantize(w, s, BLOCK).T + bias + residual
    normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    for _ in range(2):
        got_normed, got_summed = fp8_gemm.gemv_add_norm(x, w, s, BLOCK, bias, residual, norm_weight, eps,
                                                        fp8_gemm.gemv_config(tiles))
        assert _rel_err(got_summed, summed) < 1e-5 and _rel_err(got_normed, normed) < 1e-5


def test_every_one_row_candidate_runs_and_matches_reference():
    w, s = _weights(136, 384, seed=9)
    x = torch.randn(1, 384, generator=torch.Generator().manual_seed(10))
    want = x @ dequantize(w, s, BLOCK).T
    for tiles in fp8_gemm.GEMV_CANDIDATES:
        assert _rel_err(fp8_gemm.fp8_matmul(x, w, s, BLOCK, config=fp8_gemm.gemv_config(tiles)), want) < 1e-5, tiles


@pytest.mark.parametrize("rows_major", [False, True])
def test_activation_groups_are_quantized_to_e4m3(rows_major):
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(4)) * 7
    q, s = fp8_gemm.quantize_activations(x, 128, rows_major=rows_major)
    assert s.shape == (3, 2) and s.stride() == ((1, 3) if rows_major else (2, 1))
    for row in range(3):
        for g, (lo, hi) in enumerate([(0, 128), (128, 200)]):
            scale = x[row, lo:hi].abs().max() / 448  # the group's largest |x| lands on e4m3's largest value
            assert torch.allclose(s[row, g], scale)
            want = (x[row, lo:hi] / scale).to(torch.float8_e4m3fn)  # round to nearest even, as the GPU does
            assert torch.equal(q[row, lo:hi].view(torch.uint8), want.view(torch.uint8))


W8A8 = dict(kernel="w8a8", BM=64, BN=128, GROUP_M=8, num_warps=4, num_stages=3)


@pytest.mark.parametrize(("m", "n", "k", "cfg"), [
    (72, 160, 256, None),  # > 64 rows: activations quantized 1x128, FP8 x FP8
    (72, 160, 300, W8A8),  # a partial K step, rows and columns past one tile
    (130, 200, 384, {**W8A8, "BM": 32, "BN": 64, "GROUP_M": 2}),  # edge tiles in M and N, grouped launch order
    (40, 160, 600, {**W8A8, "BM": 16, "SPLIT": 3}),  # K split in 3 (2 + 2 + 1 steps, the last one partial)
    (40, 160, 384, {**W8A8, "BM": 16, "SPLIT": 8}),  # more splits asked for than K steps: one per step
])
def test_fp8_tensor_core_path_matches_reference(m, n, k, cfg):
    w, s = _weights(n, k, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    got = fp8_gemm.fp8_matmul(x, w, s, BLOCK, bias, config=cfg)
    xq, xs = quantize(x, (1, 128))
    want = dequantize(xq, xs, (1, 128)) @ dequantize(w, s, BLOCK).T + bias
    assert _rel_err(got, want) < 1e-5
    # and close to the unquantized-activation product: what per-token-group quantization costs
    assert _rel_err(got, x @ dequantize(w, s, BLOCK).T + bias) < 0.05


@pytest.mark.parametrize("m", [8, 6])
def test_scaled_mm_operands_are_the_layouts_torch_takes_and_multiply_to_the_reference(m):
    """torch._scaled_mm's 1x128 x 128x128 scaling runs on SM90 only (checked there by bench/fp8_tune.py and
    bench/fp8_kernels.py); here the operands it gets: their layouts (ScaledBlas.cpp's checks, rows in fours) and
    that A·scale_a times B·scale_b is the product on the rows that are kept."""
    n, k, padded = 256, 512, 8
    w, s = _weights(n, k, seed=9)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(10))
    a, b, a_s, b_s = fp8_gemm.scaled_mm_operands(x, w, s, BLOCK)
    assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape == (padded, k) and a.stride() == (k, 1)
    assert b.shape == (k, n) and b.stride() == (1, k)
    assert a_s.shape == (padded, k // 128) and a_s.stride() == (1, padded)
    assert b_s.shape == (k // 128, n // 128) and b_s.stride() == (1, k // 128) and (k // 128) % 4 == 0
    assert b.data_ptr() == w.data_ptr() and b_s.data_ptr() == s.data_ptr()  # no copy of the weight
    got = dequantize(a[:m], a_s[:m], (1, 128)) @ dequantize(b.t(), b_s.t(), BLOCK).T
    xq, xs = quantize(x, (1, 128))
    assert _rel_err(got, dequantize(xq, xs, (1, 128)) @ dequantize(w, s, BLOCK).T) < 1e-6


def test_scaled_mm_is_chosen_only_for_calls_it_takes():
    fits = fp8_gemm.scaled_mm_fits

    class X:  # a bf16 CUDA tensor as far as the check asks
        is_cuda, dtype = True, torch.bfloat16
    assert fits(64, 4608, 3584, BLOCK, X) and fits(3, 4608, 3584, BLOCK, X)
    assert not fits(64, 1536, 3584 - 128, BLOCK, X)  # 27 K blocks: scale_b's stride would not be a multiple of 4
    assert not fits(64, 4600, 3584, BLOCK, X)  # N not a multiple of 16
    assert not fits(64, 4608, 3584, (64, 128), X)
    X.dtype = torch.float32  # the float32 parity runs: no 32-bit output in cuBLASLt's FP8 GEMM
    assert not fits(64, 4608, 3584, BLOCK, X)
    assert not fits(64, 4608, 3584, BLOCK, torch.empty(64, 3584, dtype=torch.bfloat16))  # CPU


def test_every_measured_tile_choice_runs_and_matches_reference():
    seen = {}
    for path in sorted(fp8_gemm.CONFIG_DIR.glob("*.json")):
        for by_rows in json.loads(path.read_text())["configs"].values():
            for rows, cfg in by_rows.items():
                if cfg["kernel"] == "scaled_mm":  # cuBLASLt, no tiles of ours (the test above, the tuner on GPU)
                    continue
                tiles = {key: v for key, v in cfg.items() if key != "SPLIT"}
                seen.setdefault(json.dumps(tiles, sort_keys=True), (min(int(rows), 3), cfg))
    w, s = _weights(130, 384, seed=7)
    wd = dequantize(w, s, BLOCK)
    for m, cfg in seen.values():
        x = torch.randn(m, 384, generator=torch.Generator().manual_seed(8))
        want = x @ wd.T
        if cfg["kernel"] == "w8a8":
            want = dequantize(*quantize(x, (1, 128)), (1, 128)) @ wd.T
        assert _rel_err(fp8_gemm.fp8_matmul(x, w, s, BLOCK, config={**cfg, "SPLIT": 2}), want) < 1e-5, cfg


def test_the_nearest_measured_row_count_whose_kernel_fits_is_used():
    w8a8 = dict(kernel="w8a8", BM=64, BN=128, GROUP_M=8, num_warps=4, num_stages=3)
    table = {1: {**STREAM, "SPLIT": 1}, 4: {**STREAM, "SPLIT": 2}, 32: {**STREAM, "SPLIT": 1}, 256: w8a8}
    cublas = dict(kernel="scaled_mm")

    class X:  # a bf16 CUDA tensor as far as the dispatcher asks
        is_cuda, dtype = True, torch.bfloat16

    def pick(table, m):
        return fp8_gemm.pick_measured(table, m, lambda cfg: fp8_gemm._runs(cfg, m, 4608, 3584, BLOCK, X))
    assert pick(table, 2) is table[1]
    assert pick(table, 18) is table[4]  # a tie (14 rows either way) goes to the smaller count
    assert pick(table, 3) is table[4]
    assert pick(table, 100) is table[256]  # 32 is nearer, but the streaming kernel runs at most 64 rows
    assert pick({16: {**STREAM, "SPLIT": 1}}, 65) is None  # then the defaults
    table = {1: {**STREAM, "SPLIT": 1}, 64: w8a8, 256: cublas, 1024: cublas}
    assert pick(table, 256) is table[256] and pick(table, 600) is table[256] and pick(table, 4) is table[1]
    assert pick(table, 2000) is table[1024]
    X.dtype = torch.float32  # cuBLASLt's path is not for float32: the nearest other entry
    assert pick(table, 258) is table[64]


def test_block_sizes_the_kernels_cannot_run_are_refused():
    w, s = _weights(128, 128)
    with pytest.raises(ValueError, match=r"weight_block_size \[128, 96\]: .* power-of-two K block"):
        fp8_gemm.fp8_matmul(torch.randn(1, 128), w, s, (128, 96))
