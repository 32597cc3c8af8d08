"""The fused RoPE + KV-cache-write kernel against the rotation and the cache writes written out here in float64:
random QKV rows (a row stride wider than the row), the GQA ratios of the real models, a head dim that is not a
power of two, cache slots in random order across blocks. Every cache slot the step does not own must keep its old
bytes. An FP8 cache is refused (models/attention.py writes those unfused). Under Triton's interpreter on CPU without
a GPU, compiled on CUDA otherwise."""

import os

import pytest
import torch

from deepfleet.kernels.rope_cache import rope_write_kv

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
FP8 = torch.float8_e4m3fn


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] in float64, halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) at each token's angle."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _case(tokens, heads, kv_heads, dim, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(tokens, width + 16, generator=g).to(dtype)[:, :width]
    angles = torch.rand(tokens, dim // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    blocks = tokens // block_size + 3
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]  # distinct slots, any block, any order
    return qkv, cos, sin, blocks, slots


@pytest.mark.parametrize("tokens,heads,kv_heads,dim,block_size", [
    (1, 12, 2, 32, 16),  # the 1.5B's ratio, batch-1 decode
    (7, 28, 4, 16, 4),  # the 7B's ratio
    (5, 4, 4, 8, 8),  # MHA, head dim 8
    (3, 6, 2, 24, 4),  # a head dim that is not a power of two (halves of 12, padded to 16 and masked)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotates_and_writes_the_cache(tokens, heads, kv_heads, dim, block_size, dtype):
    qkv, cos, sin, blocks, slots = _case(tokens, heads, kv_heads, dim, block_size, dtype, seed=tokens * dim)
    old_k = torch.randn(blocks, block_size, kv_heads, dim).to(dtype)
    old_v = torch.randn(blocks, block_size, kv_heads, dim).to(dtype)
    k_cache, v_cache = old_k.to(DEVICE), old_v.to(DEVICE)
    q, k = rope_write_kv(qkv.to(DEVICE), cos[:, None].to(DEVICE), sin[:, None].to(DEVICE), heads, kv_heads,
                         k_cache, v_cache, slots.to(DEVICE))
    x = qkv.double().view(tokens, heads + 2 * kv_heads, dim)
    want_q = _rotated(x[:, :heads], cos.double(), sin.double())
    want_k = _rotated(x[:, heads : heads + kv_heads], cos.double(), sin.double())
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert q.shape == (tokens, heads, dim) and k.shape == (tokens, kv_heads, dim) and q.dtype == dtype
    assert (q.cpu().double() - want_q).abs().max() <= tol * 4
    assert (k.cpu().double() - want_k).abs().max() <= tol * 4
    flat_k, flat_v = k_cache.cpu().view(-1, kv_heads, dim), v_cache.cpu().view(-1, kv_heads, dim)
    assert torch.equal(flat_k[slots], k.cpu())  # the stored key is the returned rotated key
    assert torch.equal(flat_v[slots], qkv.view(tokens, -1, dim)[:, heads + kv_heads :])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], old_k.view(-1, kv_heads, dim)[untouched])
    assert torch.equal(flat_v[untouched], old_v.view(-1, kv_heads, dim)[untouched])


def test_refuses_an_fp8_cache():
    qkv = torch.randn(2, (4 + 2 * 2) * 16, device=DEVICE)
    cos = torch.randn(2, 8, device=DEVICE)
    cache = torch.zeros(3, 4, 2, 16, device=DEVICE).to(FP8)
    with pytest.raises(ValueError, match="FP8"):
        rope_write_kv(qkv, cos, cos, 4, 2, cache, cache, torch.arange(2, device=DEVICE))


def test_refuses_a_cache_that_does_not_fit():
    qkv = torch.randn(2, (4 + 2 * 2) * 16, device=DEVICE)
    cos = torch.randn(2, 8, device=DEVICE)
    cache = torch.zeros(3, 4, 1, 16, device=DEVICE)  # one KV head where the projection has two
    with pytest.raises(ValueError, match="rope_write_kv"):
        rope_write_kv(qkv, cos, cos, 4, 2, cache, cache, torch.arange(2, device=DEVICE))
