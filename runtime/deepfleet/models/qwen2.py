"""Qwen2 and Llama decoder-only transformers (the DeepSeek-R1-Distill-Qwen/Llama models): GQA, RoPE (with the
config's scaling), SiLU-gated MLP, RMSNorm. The two differ only in biases and RoPE scaling, read from config.json."""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.models.attention import AttentionMetadata, paged_attention
from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import Embedding, GatedMLP, RMSNorm, RotaryEmbedding, linear

# checkpoint projection name -> (fused module, shard index)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.get("head_dim") or cfg.hidden_size // cfg.num_heads
        # Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) only with attention_bias
        qkv_bias = cfg.arch == "qwen2" or bool(cfg.get("attention_bias", False))
        o_bias = cfg.arch == "llama" and bool(cfg.get("attention_bias", False))
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = linear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias)
        self.o_proj = linear(q_size, cfg.hidden_size, bias=o_bias)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def forward(self, rope, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(rope, q, k)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.head_dim)
        return self.o_proj(out.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.require("intermediate_size"), bias=bool(cfg.get("mlp_bias", False)))

    def forward(self, rope, x, residual, kv_cache, meta):
        return decoder_layer_forward(self, rope, x, residual, kv_cache, meta)


def decoder_layer_forward(layer, rope, x, residual, kv_cache, meta):
    """Pre-norm block; the residual stream is carried separately so each add fuses into the following norm."""
    if residual is None:
        residual, x = x, layer.input_layernorm(x)
    else:
        x, residual = layer.input_layernorm(x, residual)
    x = layer.self_attn(rope, x, kv_cache, meta)
    x, residual = layer.post_attention_layernorm(x, residual)
    return layer.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls, rotary: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([layer_cls(cfg, i, rotary) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.get("rms_norm_eps", 1e-6))
        self.rotary = rotary

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        residual = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(rope, x, residual, cache, meta)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """What the model runner sees: forward -> final hidden states, compute_logits, the KV-cache layout per layer
    and the mapping from checkpoint tensor names to (parameter, shard)."""

    fused_names: dict[str, tuple[str, int]] = {}

    def __init__(self, cfg: ModelConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        self.model = backbone
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.lm_head = None if self.tied else linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def param_for(self, name: str) -> tuple[str, object] | None:
        """Checkpoint tensor name -> (parameter name, shard) or None for tensors this model does not use."""
        if "rotary_emb.inv_freq" in name:
            return None
        if self.tied and name == "lm_head.weight":
            return None
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in self.fused_names:
                fused, shard = self.fused_names[part]
                return ".".join([*parts[:i], fused, *parts[i + 1 :]]), shard
        return name, None


class Qwen2ForCausalLM(CausalLM):
    fused_names = _FUSED

    def __init__(self, cfg: ModelConfig, max_positions: int):
        head_dim = cfg.get("head_dim") or cfg.hidden_size // cfg.num_heads
        rotary = RotaryEmbedding(head_dim, max_positions, cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling"))
        super().__init__(cfg, Backbone(cfg, lambda c, _i, r: DecoderLayer(c, r), rotary))
        self.head_dim = head_dim

    def kv_cache_layout(self) -> tuple[int, int, int | None]:
        """(kv heads, key dim, value dim or None when values live inside the keys)"""
        return self.cfg.num_kv_heads, self.head_dim, self.head_dim
