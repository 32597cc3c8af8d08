"""What every decoder-only model here shares: the pre-norm block wiring, the embedding → layers → norm backbone, and
the interface the model runner sees (hidden states, logits, KV-cache layout, checkpoint-name mapping)."""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.distributed.layers import VocabParallelEmbedding
from deepfleet.models.attention import AttentionMetadata
from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import RMSNorm, RotaryEmbedding, project_add_norm

# checkpoint projection name -> (fused module, shard index)
FUSED_PROJECTIONS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                     "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def decoder_layer_forward(layer, rope, x, residual, kv_cache, meta, next_norm=None):
    """Pre-norm block; the residual stream is carried separately so each add fuses into the following norm.
    With `next_norm` (the next layer's input norm, or the final norm) the block ends in that norm: it returns
    (next_norm(out + residual), out + residual), so the down projection can take the add + norm into its GEMV
    (models/layers.py project_add_norm), and x arrives already normalised (except at the first layer)."""
    if residual is None:
        residual, x = x, layer.input_layernorm(x)
    elif next_norm is None:
        x, residual = layer.input_layernorm(x, residual)
    attn = layer.self_attn
    if hasattr(attn, "attend"):  # (Qwen2/Llama) the O projection's GEMV can take the add + norm after it
        x, residual = project_add_norm(attn.o_proj, attn.attend(rope, x, kv_cache, meta), residual,
                                       layer.post_attention_layernorm)
    else:
        x, residual = layer.post_attention_layernorm(attn(rope, x, kv_cache, meta), residual)
    if next_norm is None:
        return layer.mlp(x), residual
    return project_add_norm(layer.mlp.down_proj, layer.mlp.activate(x), residual, next_norm)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls, rotary: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([layer_cls(cfg, i, rotary) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.get("rms_norm_eps", 1e-6))
        self.rotary = rotary
        # layers that take the norm after them (decoder_layer_forward's next_norm: Qwen2/Llama)
        self.chains_norms = len(self.layers) > 0 and all(getattr(layer, "chains_norms", False)
                                                         for layer in self.layers)

    def _next_norms(self) -> list[RMSNorm]:
        return [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]

    def add_norm_pairs(self) -> list[tuple[nn.Module, RMSNorm]]:
        """(projection, the residual RMSNorm right after it) wherever the wiring joins the two in one
        project_add_norm call, for models/layers.py choose_gemv."""
        pairs = [(layer.self_attn.o_proj, layer.post_attention_layernorm) for layer in self.layers
                 if hasattr(layer.self_attn, "attend")]
        if self.chains_norms:
            pairs += [(layer.mlp.down_proj, norm) for layer, norm in zip(self.layers, self._next_norms(), strict=True)]
        return pairs

    def forward(self, input_ids, positions, kv_caches, meta):
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        residual = None
        if self.chains_norms:  # each layer ends in the next one's input norm, the last in the final norm
            for layer, cache, next_norm in zip(self.layers, kv_caches, self._next_norms(), strict=True):
                x, residual = layer(rope, x, residual, cache, meta, next_norm)
            return x
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
        self.lm_head = None if self.tied else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[T, vocab] float32, written into `out` when given."""
        return (self.model.embed_tokens if self.tied else self.lm_head).logits(hidden, out)

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
