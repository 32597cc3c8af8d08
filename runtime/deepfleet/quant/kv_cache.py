"""The KV cache's storage format (engine.kv_cache_dtype): "auto" keeps keys and values in the compute dtype, "fp8"
stores them as float8_e4m3fn, half the bytes of bf16 per token, so twice the tokens fit the same memory.

An FP8 cache holds k / k_scale and v / v_scale with float32 scales per layer and KV head (per-tensor scales are
the case of equal heads). Scales of 1.0 are what the engine uses: a bf16/fp32 checkpoint carries no calibrated
KV scales, and vLLM makes the same choice without them. e4m3 then holds |x| up to 448 with 3 mantissa bits (a
relative step of 1/16; 2^-9 absolute below 2^-6); values beyond 448 are clamped, not turned into NaN. The cache
write (models/attention.py) divides by the scale and rounds to e4m3; the paged attention kernel widens each tile
to the query's dtype and folds the scales into the softmax scale and the output; the CPU reference dequantizes
the rows it gathers.

Refused before the model loads, naming the setting: an unknown value, MLA's latent cache (DeepSeek-V3: its latent
kernels read the compute dtype only), and a GPU without FP8 conversions (compute capability below 8.9)."""

from __future__ import annotations

import torch

from deepfleet.quant.spec import FP8_MIN_CAPABILITY

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KV_CACHE_DTYPES = ("auto", "fp8")


def cache_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype, model_raw: dict, device: torch.device) -> torch.dtype:
    """The dtype the KV cache is stored in, or ValueError naming what cannot be served."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not supported ({', '.join(KV_CACHE_DTYPES)})")
    if kv_cache_dtype == "auto":
        return compute_dtype
    if model_raw.get("kv_lora_rank"):
        arch = (model_raw.get("architectures") or [model_raw.get("model_type", "this model")])[0]
        raise ValueError(f"kv_cache_dtype: fp8 is not supported for {arch}'s MLA latent cache; use auto")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        cap = torch.cuda.get_device_capability(device)
        raise ValueError(f"kv_cache_dtype: fp8 needs compute capability {FP8_MIN_CAPABILITY[0]}."
                         f"{FP8_MIN_CAPABILITY[1]}+; device {device} ({torch.cuda.get_device_name(device)}) "
                         f"has {cap[0]}.{cap[1]}")
    return FP8


def default_scales(kv_heads: int, device: torch.device) -> torch.Tensor:
    return torch.ones(kv_heads, dtype=torch.float32, device=device)


def quantize(new: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """new [T, kv_heads, dim] -> FP8 new / scale (scale [kv_heads]), clamped to e4m3's range."""
    return (new.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(rows: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows [..., kv_heads, dim] FP8 -> rows · scale in `dtype`."""
    return (rows.float() * scale[:, None]).to(dtype)
