"""What one model needs, from the engine's own code: its parameters, FP8 block scales and buffers come from the
real model class built on the meta device (shapes only, no memory) under the engine's quantization spec, its KV
layout from the model's `kv_cache_layout()`, its KV bytes from `deepfleet.engine.memory`. Only the activation
estimate and the tensor-parallel split (which tensors are replicated) are this module's own arithmetic."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from deepfleet.engine import memory
from deepfleet.models.config import ModelConfig, parse_config
from deepfleet.models.loader import build_model
from deepfleet.quant.spec import resolve as resolve_quantization

WEIGHT_DTYPES = ("bfloat16", "float16", "fp8")  # fp8: the engine's block-FP8 layers (quant/), scales included
KV_DTYPE_BYTES = 2  # the cache is kept in the activation dtype (bf16/fp16), also for fp8 weights


@dataclass
class Footprint:
    name: str
    arch: str
    params: int
    weight_dtype: str
    weight_bytes: int  # the whole model in weight_dtype, fp8 block scales included
    sharded_bytes: int  # the part tensor parallelism splits across GPUs
    replicated_bytes: int  # norms, biases, router, rotary tables: every GPU holds them
    num_layers: int
    kv_layout: memory.KVLayout
    kv_bytes_per_token_per_layer: int
    kv_bytes_per_token: int
    cfg: ModelConfig

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "cfg"} | {"kv_layout": list(self.kv_layout)}


def model_config(raw: dict[str, Any], source: Path) -> tuple[ModelConfig, str | None]:
    """Parse config.json contents for sizing; a quantization_config names the checkpoint's own weight dtype."""
    cfg = parse_config(raw, source)
    return cfg, (cfg.quantization.method if cfg.quantization else None)


def _replicated(name: str, p: torch.Tensor) -> bool:
    # what tensor parallelism does not split: norms, biases, the MoE router
    return p.dim() < 2 or ".mlp.gate." in f".{name}"


def footprint(name: str, cfg: ModelConfig, weight_dtype: str) -> Footprint:
    """Bytes are the engine's own model built on the meta device: FP8 projections are its Fp8Linear / stacked-expert
    layers with their float32 block scales, the rest in the activation dtype."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype: {weight_dtype!r} is not supported (choose {', '.join(WEIGHT_DTYPES)})")
    torch_dtype = torch.float16 if weight_dtype == "float16" else torch.bfloat16
    spec = resolve_quantization(cfg.raw, cfg.path / "config.json", "fp8") if weight_dtype == "fp8" else None
    model = build_model(replace(cfg, quantization=spec), torch_dtype, torch.device("meta"),
                        cfg.max_position_embeddings, spec)
    sharded = replicated = params = 0
    for pname, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if not pname.endswith("scale_inv"):
            params += p.numel()
        if _replicated(pname, p):
            replicated += size
        else:
            sharded += size
    replicated += sum(b.numel() * b.element_size() for b in model.buffers())
    layout = model.kv_cache_layout()
    per_layer = memory.kv_bytes_per_token_per_layer(layout, KV_DTYPE_BYTES)
    return Footprint(
        name=name, arch=cfg.arch, params=params, weight_dtype=weight_dtype, weight_bytes=sharded + replicated,
        sharded_bytes=sharded, replicated_bytes=replicated, num_layers=cfg.num_layers, kv_layout=layout,
        kv_bytes_per_token_per_layer=per_layer, kv_bytes_per_token=per_layer * cfg.num_layers, cfg=cfg,
    )


def kv_layout_per_gpu(layout: memory.KVLayout, tp: int) -> memory.KVLayout:
    """GQA splits its KV heads across tensor-parallel ranks (replicated when there are fewer heads than ranks);
    MLA's single latent "head" cannot be split: every rank caches the whole latent."""
    heads, k_dim, v_dim = layout
    return (max(1, heads // tp), k_dim, v_dim)


def activation_bytes(cfg: ModelConfig, tokens: int, tp: int) -> int:
    """Transient memory of the largest prefill the engine profiles (`tokens` rows through one layer at a time):
    the residual stream and its norm, the q/k/v and the gated MLP's gate|up and product, per GPU. An estimate:
    the engine measures this on the GPU at start-up."""
    h, dtype_bytes = cfg.hidden_size, KV_DTYPE_BYTES
    if cfg.arch == "deepseek_v3":
        inner = max(cfg.require("intermediate_size"),
                    cfg.require("moe_intermediate_size") * (cfg.get("n_shared_experts") or 1))
        qkv = cfg.num_heads * (cfg.require("qk_nope_head_dim") + cfg.require("qk_rope_head_dim")
                               + cfg.require("v_head_dim")) // tp + cfg.require("kv_lora_rank")
    else:
        head_dim = cfg.get("head_dim") or h // cfg.num_heads
        inner = cfg.require("intermediate_size")
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * head_dim // tp
    return tokens * dtype_bytes * (3 * h + qkv + 3 * inner // tp)
