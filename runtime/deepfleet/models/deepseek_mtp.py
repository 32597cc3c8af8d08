"""DeepSeek-V3/R1's multi-token-prediction (MTP) module, loaded from `model.layers.<num_hidden_layers>.*` of the
checkpoint (`num_nextn_predict_layers` of them; V3/R1 ship one, layer 61) and used as the speculative draft.

For position p it combines the target's final hidden state h_p with the embedding of the token that follows,
x_{p+1}: eh_proj([enorm(embed(x_{p+1})); hnorm(h_p)]) -> one full decoder layer (MLA + MoE, its own latent KV
cache at position p) -> shared_head (norm, head) gives the logits of x_{p+2}. The output hidden state before the
head chains into the next draft when more tokens are drafted than there are MTP layers (the one layer is reused,
as vLLM does). The concatenation order (embedding first) and the use of the target's post-norm hidden state
follow vLLM's and SGLang's DeepSeek MTP, which reach the published acceptance rates with the released weights.

eh_proj, the norms, embed_tokens and shared_head.head stay in the compute dtype (the FP8 release stores them in
bf16); the decoder layer's projections are block-FP8 like every other layer's."""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.distributed.layers import VocabParallelEmbedding
from deepfleet.models.attention import AttentionMetadata
from deepfleet.models.base import decoder_layer_forward
from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import RMSNorm, RotaryEmbedding, linear


class MtpLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, rotary: RotaryEmbedding, decoder_layer_cls):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.get("rms_norm_eps", 1e-6)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, h)
        self.enorm, self.hnorm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.eh_proj = linear(2 * h, h, quantize=False)
        block = decoder_layer_cls(cfg, index, rotary)  # its sub-modules sit at this level, as in the checkpoint
        self.input_layernorm, self.self_attn = block.input_layernorm, block.self_attn
        self.post_attention_layernorm, self.mlp = block.post_attention_layernorm, block.mlp
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, eps)
        self.shared_head.head = VocabParallelEmbedding(cfg.vocab_size, h)
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, kv_cache,
                meta: AttentionMetadata) -> torch.Tensor:
        """hidden [T, H] (target's, or the previous draft step's), next_ids [T] -> this step's hidden [T, H]."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1))
        x, residual = decoder_layer_forward(self, self.rotary.lookup(positions, x.dtype), x, None, kv_cache, meta)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head.logits(self.shared_head.norm(hidden))
