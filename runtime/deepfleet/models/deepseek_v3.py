"""DeepSeek-V3/R1 (`DeepseekV3ForCausalLM`): multi-head latent attention (MLA) and a mixture of experts with shared
experts and grouped top-k routing; the first `first_k_dense_replace` layers use a dense MLP.

MLA caches, per token, only the normalised compressed latent (kv_lora_rank) and the rotated rope key
(qk_rope_head_dim) as one "head". Attention runs in the weight-absorbed form for prefill and decode alike: the
per-head key up-projection is folded into the query (q_nope · W_UK) and the value up-projection is applied after
attention (· W_UV), so attention is multi-query over the latent (keys = [latent | rope key], values = latent)
and the cache is never expanded per head. This is exact algebra; it costs more FLOPs than the expanded form for
long prefills but needs no second code path.

Routing follows the Hugging Face transformers implementation, which matches the official inference code:
sigmoid scores, a correction bias used only to choose experts, groups ranked by the sum of their two best biased
scores, top-k inside the `topk_group` best groups, weights from the unbiased scores normalised
(`norm_topk_prob`) and multiplied by `routed_scaling_factor`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepfleet.models.attention import AttentionMetadata, paged_attention
from deepfleet.models.base import FUSED_PROJECTIONS, Backbone, CausalLM, decoder_layer_forward
from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, _yarn_mscale, linear, silu_and_mul

_EXPERT_SHARDS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_lora_rank = cfg.get("q_lora_rank")
        self.kv_lora_rank = cfg.require("kv_lora_rank")
        self.nope, self.rope = cfg.require("qk_nope_head_dim"), cfg.require("qk_rope_head_dim")
        self.v_dim = cfg.require("v_head_dim")
        bias = bool(cfg.get("attention_bias", False))
        eps = cfg.get("rms_norm_eps", 1e-6)
        q_out = self.num_heads * (self.nope + self.rope)
        if self.q_lora_rank:
            self.q_a_proj = linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps)
            self.q_b_proj = linear(self.q_lora_rank, q_out)
        else:
            self.q_proj = linear(h, q_out)
        self.kv_a_proj_with_mqa = linear(h, self.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps)
        self.kv_b_proj = linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_dim))
        self.o_proj = linear(self.num_heads * self.v_dim, h, bias=bias)
        self.rotary = rotary
        scale = (self.nope + self.rope) ** -0.5
        scaling = cfg.get("rope_scaling") or {}
        if scaling.get("mscale_all_dim"):
            scale *= _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.scale = scale

    def forward(self, rope, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_rope = q.view(t, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope, k_rope = self.rotary(rope, q_rope, k_rope.view(t, 1, self.rope))
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.nope, self.v_dim], dim=1)
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)
        query = torch.cat([q_latent, q_rope], dim=-1)
        key = torch.cat([latent.view(t, 1, self.kv_lora_rank), k_rope], dim=-1)
        out_latent = paged_attention(query, key, None, kv_cache[0], None, meta, self.scale, self.kv_lora_rank)
        out = torch.einsum("thc,hvc->thv", out_latent, w_uv)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))


class Experts(nn.Module):
    """Routed experts stacked as [E, 2I, H] (gate|up) and [E, H, I] (down): one tensor per kind, ready for grouped
    GEMM or expert-parallel sharding later; each checkpoint tensor loads into its expert's slice."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.num_experts, self.inner = num_experts, inner
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inner), requires_grad=False)
        for p, shards in ((self.w13, (0, 1)), (self.w2, (None,))):
            p.weight_loader = self._load
            p.expected_shards = [(e, s) for e in range(num_experts) for s in shards]

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> None:
        expert, half = shard
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} out of range (n_routed_experts={self.num_experts})")
        target = param.data[expert] if half is None else param.data[expert].narrow(0, half * self.inner, self.inner)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {tuple(target.shape)}")
        target.copy_(tensor)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        # token-major loop over the experts that received tokens (a grouped-GEMM kernel would replace this)
        for expert in torch.unique(topk_ids).tolist():
            token_idx, slot = torch.where(topk_ids == expert)
            h = silu_and_mul(F.linear(x[token_idx], self.w13[expert]))
            h = F.linear(h, self.w2[expert]) * topk_weights[token_idx, slot, None].to(x.dtype)
            out.index_add_(0, token_idx, h)
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_experts = cfg.require("n_routed_experts")
        self.top_k, self.n_group = cfg.require("num_experts_per_tok"), cfg.get("n_group") or 1
        self.topk_group = cfg.get("topk_group") or 1
        self.norm_topk_prob = bool(cfg.get("norm_topk_prob", True))
        self.scaling = float(cfg.get("routed_scaling_factor", 1.0))
        if self.num_experts % self.n_group:
            raise ValueError(f"{cfg.path / 'config.json'}: n_routed_experts must be a multiple of n_group")
        inner = cfg.require("moe_intermediate_size")
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.empty(self.num_experts, h), requires_grad=False)
        # the correction bias only ranks experts; kept in float32 as the reference does
        self.gate.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts, dtype=torch.float32),
                                                         requires_grad=False)
        self.experts = Experts(self.num_experts, h, inner)
        n_shared = cfg.get("n_shared_experts") or 0
        self.shared_experts = GatedMLP(h, inner * n_shared) if n_shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()
        choice = scores + self.gate.e_score_correction_bias
        t = x.shape[0]
        groups = choice.view(t, self.n_group, -1).topk(min(2, self.num_experts // self.n_group), dim=-1)[0].sum(-1)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(self.topk_group, dim=-1)[1], True)
        choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // self.n_group, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        out = self.experts(x, ids, weights)
        return out + self.shared_experts(x) if self.shared_experts is not None else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, rotary: RotaryEmbedding):
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.self_attn = MLAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        dense = idx < (cfg.get("first_k_dense_replace") or 0) or idx % (cfg.get("moe_layer_freq") or 1)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.require("intermediate_size")) if dense else MoE(cfg)

    def forward(self, rope, x, residual, kv_cache, meta):
        return decoder_layer_forward(self, rope, x, residual, kv_cache, meta)


class DeepseekV3ForCausalLM(CausalLM):
    fused_names = FUSED_PROJECTIONS
    cuda_graph_safe = False  # expert dispatch sizes depend on the routing (host sync)

    def __init__(self, cfg: ModelConfig, max_positions: int):
        rope_dim = cfg.require("qk_rope_head_dim")
        scaling = cfg.get("rope_scaling")
        rotary = RotaryEmbedding(rope_dim, max_positions, cfg.get("rope_theta", 10000.0), scaling,
                                 interleaved=cfg.get("rope_interleave", True))
        super().__init__(cfg, Backbone(cfg, DecoderLayer, rotary))
        self.kv_lora_rank, self.rope_dim = cfg.require("kv_lora_rank"), rope_dim

    def kv_cache_layout(self) -> tuple[int, int, int | None]:
        return 1, self.kv_lora_rank + self.rope_dim, None  # values are the latent part of the cached keys

    def param_for(self, name: str) -> tuple[str, object] | None:
        parts = name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) >= self.cfg.num_layers:
            return None  # multi-token-prediction layers (model.layers.61 in V3) are not used for decoding
        if "experts" in parts:
            i = parts.index("experts")
            if i + 2 < len(parts) and parts[i + 1].isdigit() and parts[i + 2] in _EXPERT_SHARDS:
                stacked, half = _EXPERT_SHARDS[parts[i + 2]]
                return ".".join([*parts[: i + 1], stacked]), (int(parts[i + 1]), half)
        return super().param_for(name)
