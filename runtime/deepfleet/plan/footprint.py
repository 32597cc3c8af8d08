"""What one model needs, from the engine's own code: its parameters and buffers come from the real model class
built on the meta device (shapes only, no memory), its KV layout from the model's `kv_cache_layout()`, its KV
bytes from `deepfleet.engine.memory`. Only the weight encoding (bf16/fp16/fp8 with block scales) and the
activation estimate are this module's own arithmetic."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepfleet.engine import memory
from deepfleet.models.config import ModelConfig, parse_config
from deepfleet.models.loader import build_model

WEIGHT_DTYPES = {"bfloat16": 2, "float16": 2, "fp8": 1}  # bytes per weight element
FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size [128, 128]: one float32 scale per 128x128 tile
FP8_SCALE_BYTES = 4
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
    raw = dict(raw)
    quant = raw.pop("quantization_config", None)
    cfg = parse_config(raw, source)
    checkpoint_dtype = "fp8" if quant and quant.get("quant_method") == "fp8" else None
    return cfg, checkpoint_dtype


def _fp8_quantized(name: str, p: torch.Tensor) -> bool:
    # the DeepSeek-V3 FP8 checkpoint quantizes every projection inside the decoder layers (attention, dense and
    # shared MLPs, routed experts); embeddings, lm_head, norms and the MoE router stay in bf16
    return ".layers." in f".{name}" and p.dim() >= 2 and not name.endswith("mlp.gate.weight")


def _fp8_bytes(p: torch.Tensor) -> int:
    *lead, rows, cols = p.shape
    tiles = math.prod(lead) * math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)
    return p.numel() + tiles * FP8_SCALE_BYTES


def footprint(name: str, cfg: ModelConfig, weight_dtype: str) -> Footprint:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype: {weight_dtype!r} is not supported (choose {', '.join(WEIGHT_DTYPES)})")
    torch_dtype = torch.float16 if weight_dtype == "float16" else torch.bfloat16
    model = build_model(cfg, torch_dtype, torch.device("meta"), cfg.max_position_embeddings)
    sharded = replicated = params = 0
    for pname, p in model.named_parameters():
        params += p.numel()
        size = _fp8_bytes(p) if weight_dtype == "fp8" and _fp8_quantized(pname, p) else p.numel() * 2
        if p.dim() >= 2 and not pname.endswith("mlp.gate.weight"):
            sharded += size
        else:
            replicated += size
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
