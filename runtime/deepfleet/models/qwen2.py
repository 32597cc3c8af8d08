"""Qwen2 and Llama decoder-only transformers (the DeepSeek-R1-Distill-Qwen/Llama models): GQA, RoPE (with the
config's scaling), SiLU-gated MLP, RMSNorm. The two differ only in biases and RoPE scaling, read from config.json."""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.distributed.layers import local_heads
from deepfleet.models.attention import AttentionMetadata, rope_paged_attention
from deepfleet.models.base import FUSED_PROJECTIONS, Backbone, CausalLM, decoder_layer_forward
from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, linear


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.head_dim = cfg.get("head_dim") or cfg.hidden_size // cfg.num_heads
        self.num_heads, self.num_kv_heads = local_heads(cfg.num_heads), local_heads(cfg.num_kv_heads)
        # Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) only with attention_bias
        qkv_bias = cfg.arch == "qwen2" or bool(cfg.get("attention_bias", False))
        o_bias = cfg.arch == "llama" and bool(cfg.get("attention_bias", False))
        q_size, kv_size = cfg.num_heads * self.head_dim, cfg.num_kv_heads * self.head_dim
        self.qkv_proj = linear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias, parallel="column",
                               unit=self.head_dim)
        self.o_proj = linear(q_size, cfg.hidden_size, bias=o_bias, parallel="row")
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def attend(self, rope, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """The attention output before the O projection, [T, heads x head dim] (the decoder layer fuses the O
        projection with the norm after it: models/base.py)."""
        out = rope_paged_attention(self.qkv_proj(x), rope, self.rotary, self.num_heads, self.num_kv_heads,
                                   self.head_dim, kv_cache, meta, self.scale)
        return out.reshape(x.shape[0], -1)

    def forward(self, rope, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend(rope, x, kv_cache, meta))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.require("intermediate_size"), bias=bool(cfg.get("mlp_bias", False)))

    chains_norms = True  # forward takes the norm after the block (models/base.py decoder_layer_forward)

    def forward(self, rope, x, residual, kv_cache, meta, next_norm=None):
        return decoder_layer_forward(self, rope, x, residual, kv_cache, meta, next_norm)


class Qwen2ForCausalLM(CausalLM):
    fused_names = FUSED_PROJECTIONS

    def __init__(self, cfg: ModelConfig, max_positions: int):
        head_dim = cfg.get("head_dim") or cfg.hidden_size // cfg.num_heads
        rotary = RotaryEmbedding(head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        super().__init__(cfg, Backbone(cfg, lambda c, _i, r: DecoderLayer(c, r), rotary))
        self.head_dim = head_dim

    def kv_cache_layout(self) -> tuple[int, int, int | None]:
        """(kv heads, key dim, value dim or None when values live inside the keys)"""
        return local_heads(self.cfg.num_kv_heads), self.head_dim, self.head_dim
