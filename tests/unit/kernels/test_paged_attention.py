"""The Triton paged-attention kernel against a float64 attention written out here, on random ragged batches: lengths
from 1 token to several blocks, block tables in random order, prefix-cache hits (shared blocks), prefill chunks
that start and end inside a block, decodes and prefills in one launch, the flash-decoding split, the GQA ratios of
the real models (Qwen2-7B 28/4, 1.5B 12/2, Llama-8B 32/8), MHA, and the MLA layout (keys 512 + 64, values = the
first 512 key features, no value cache).

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET
before triton's first import); sizes are kept small because the interpreter is slow. On a GPU host the same cases
run compiled on CUDA tensors."""

import math
import os

import pytest
import torch

from deepfleet.kernels.paged_attention import Tiling, paged_attention

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# an empty flash-decoding split stores log2(0) = -inf on purpose (its merge weight is 0); numpy warns about it
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning"),
              pytest.mark.usefixtures("interpreter_scalar_index")]
DEVICE = "cpu" if INTERPRETED else "cuda"

# (name, heads, kv_heads, k_dim, v_dim or None = k_dim, mla, [(query_len, seq_len)], options)
CASES = [
    ("decode-qwen7b", 28, 4, 128, None, False, [(1, 1), (1, 15), (1, 16), (1, 17), (1, 70)], {}),
    ("decode-qwen1.5b-5-splits", 12, 2, 128, None, False, [(1, 33), (1, 100)], {"num_splits": 5}),
    ("decode-llama8b-no-split", 32, 8, 128, None, False, [(1, 7), (1, 48)], {"num_splits": 1}),
    ("decode-mha-block8", 4, 4, 16, None, False, [(1, 3), (1, 20), (1, 9)], {"block_size": 8}),
    ("head-dim-8", 2, 1, 8, None, False, [(1, 5), (4, 19)], {}),  # below tl.dot's 16: padded and masked
    # half precision as float16: Triton 3.6's interpreter multiplies bfloat16 tiles wrongly (bf16 runs on the GPU)
    ("decode-fp16", 12, 2, 128, None, False, [(1, 10), (1, 70)], {"dtype": torch.float16}),
    ("prefill-fresh", 12, 2, 16, None, False, [(20, 20), (5, 5)], {}),
    ("prefill-chunks", 28, 4, 32, None, False, [(16, 40), (7, 23), (20, 20)], {}),
    ("prefix-hit", 28, 4, 32, None, False, [(3, 35), (10, 42)], {"shared_blocks": 2}),
    ("mixed", 32, 8, 64, None, False, [(1, 30), (1, 5), (13, 13), (40, 50)], {}),
    ("mixed-3-splits", 12, 2, 16, None, False, [(1, 60), (9, 41), (1, 2)], {"num_splits": 3}),
    ("mla-576", 32, 1, 576, 512, True, [(1, 20), (1, 45), (6, 30)], {}),
    ("mla-tiny", 4, 1, 40, 32, True, [(1, 9), (12, 12), (5, 21)], {}),
    # 4 splits of at least 2 tiles of 16 keys: 1 split used at 5 keys (written directly), 2 at 40, 3 at 130
    ("decode-min-split-tiles", 12, 2, 32, None, False, [(1, 5), (1, 40), (1, 130)],
     {"tiling": Tiling(16, 2, 3, splits=4, min_split_tiles=2)}),
    # 16 blocks of 8 keys per iteration, the last one ragged
    ("decode-tile-128-block8", 4, 2, 16, None, False, [(1, 3), (1, 130), (1, 200)],
     {"block_size": 8, "tiling": Tiling(128, 4, 2)}),
    ("mla-576-3-of-4-splits", 16, 1, 576, 512, True, [(1, 300)], {"num_splits": 4}),  # >= 4 tiles of 32 a split
]


def _build(heads, kv_heads, k_dim, v_dim, mla, specs, options, seed):
    g = torch.Generator().manual_seed(seed)
    bs, dtype = options.get("block_size", 16), options.get("dtype", torch.float32)
    shared = options.get("shared_blocks", 0)
    v_dim = v_dim or k_dim
    needs = [math.ceil(seq_len / bs) for _, seq_len in specs]
    num_blocks = sum(needs) + 3
    order = torch.randperm(num_blocks - 1, generator=g).tolist()  # block ids handed out in random order
    tables = []
    for i, n in enumerate(needs):
        table = tables[0][:shared] if i and shared else []  # prefix hit: the first blocks of sequence 0
        while len(table) < n:
            table.append(order.pop())
        tables.append(table)
    width = max(needs) + 1
    scratch = num_blocks - 1  # pads the block tables, as the engine's scratch block does
    qlens = [q for q, _ in specs]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(
        q=rand(sum(qlens), heads, k_dim),
        k_cache=rand(num_blocks, bs, kv_heads, k_dim),
        v_cache=None if mla else rand(num_blocks, bs, kv_heads, v_dim),
        v_dim=v_dim,
        block_tables=torch.tensor([t + [scratch] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor([s for _, s in specs], dtype=torch.int32),
        query_start_loc=torch.tensor([sum(qlens[:i]) for i in range(len(qlens) + 1)], dtype=torch.int32),
        max_query_len=max(qlens),
        scale=k_dim**-0.5,
        num_splits=options.get("num_splits"),
        tiling=options.get("tiling"),
    )


def _expected(case) -> torch.Tensor:
    """Softmax attention in float64, one sequence at a time, keys read position by position via the block table."""
    q, k_cache, v_cache, v_dim = case["q"].double(), case["k_cache"].double(), case["v_cache"], case["v_dim"]
    bs, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    starts = case["query_start_loc"].tolist()
    rows = []
    for s, seq_len in enumerate(case["seq_lens"].tolist()):
        pos = torch.arange(seq_len)
        blocks = case["block_tables"][s, pos // bs].long()
        keys = k_cache[blocks, pos % bs]  # [L, Hkv, Dk]
        values = keys[..., :v_dim] if v_cache is None else v_cache.double()[blocks, pos % bs]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        qs = q[starts[s] : starts[s + 1]]
        query_pos = seq_len - qs.shape[0] + torch.arange(qs.shape[0])
        scores = torch.einsum("qhd,lhd->hql", qs, keys) * case["scale"]
        scores = scores.masked_fill(pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        rows.append(torch.einsum("hql,lhd->qhd", scores.softmax(-1), values))
    return torch.cat(rows)


def _on_device(case):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_kernel_matches_reference(index):
    case = _build(*CASES[index][1:], seed=index)
    out = paged_attention(**_on_device(case)).cpu()
    expected = _expected(case)
    assert out.shape == expected.shape and out.dtype == case["q"].dtype
    tol = 4e-3 if out.dtype == torch.float16 else 2e-5
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), f"{CASES[index][0]}: max error {err}"


def test_split_launches_back_to_back():
    """The split merge happens in the launch, by the last split program to arrive, which resets its arrival
    counter: launches one after another (another shape between, the same shape again) each merge correctly."""
    # decode-qwen1.5b-5-splits (3 of its 5 splits empty at 33 tokens), mixed-3-splits, decode-min-split-tiles
    for index in (1, 10, 1, 13, 13):
        case = _build(*CASES[index][1:], seed=50 + index)
        out = paged_attention(**_on_device(case)).cpu().double()
        expected = _expected(case)
        assert (out - expected).abs().max().item() <= 2e-5 * max(1.0, expected.abs().max().item()), CASES[index][0]


FP8_CASES = [
    ("fp8-decode-2-splits", 12, 2, 32, None, False, [(1, 9), (1, 40)], {"num_splits": 2}),
    ("fp8-mixed-fp16", 8, 2, 16, None, False, [(1, 20), (7, 19)], {"dtype": torch.float16}),
]


def _to_fp8(cache, scale):
    return (cache.float() / scale[:, None]).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("index", range(len(FP8_CASES)), ids=[c[0] for c in FP8_CASES])
def test_fp8_cache_matches_reference_on_its_dequantized_values(index):
    case = _build(*FP8_CASES[index][1:], seed=100 + index)
    kv_heads = case["k_cache"].shape[2]
    # a scale per KV head (not one for all): each head's largest value lands near e4m3's 448
    for name, scale_name in (("k_cache", "k_scale"), ("v_cache", "v_scale")):
        scale = case[name].float().abs().amax(dim=(0, 1, 3)) / 400 * torch.linspace(1, 2, kv_heads)
        case[name], case[scale_name] = _to_fp8(case[name], scale), scale
    out = paged_attention(**_on_device(case)).cpu()
    dequantized = {**case, "k_cache": case["k_cache"].double() * case["k_scale"].double()[:, None],
                   "v_cache": case["v_cache"].double() * case["v_scale"].double()[:, None]}
    expected = _expected(dequantized)
    tol = 4e-3 if out.dtype == torch.float16 else 2e-5
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), f"{FP8_CASES[index][0]}: max error {err}"


def test_fp8_cache_without_scales_is_refused():
    case = _build(*FP8_CASES[0][1:], seed=0)
    case["k_cache"] = case["k_cache"].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="FP8 KV cache needs its k_scale"):
        paged_attention(**case)


def test_bad_shapes_are_named():
    case = _build(*CASES[0][1:], seed=0)
    case["q"] = case["q"][..., :64]
    with pytest.raises(ValueError, match=r"query \[5, 28, 64\] does not fit the key cache"):
        paged_attention(**case)
