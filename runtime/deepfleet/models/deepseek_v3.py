"""DeepSeek-V3/R1 (`DeepseekV3ForCausalLM`): multi-head latent attention (MLA) and a mixture of experts with shared
experts and grouped top-k routing; the first `first_k_dense_replace` layers use a dense MLP.

MLA caches, per token, only the normalised compressed latent (kv_lora_rank) and the rotated rope key
(qk_rope_head_dim) as one "head". Attention runs in the weight-absorbed form for prefill and decode alike: the
per-head key up-projection is folded into the query (q_nope · W_UK) and the value up-projection is applied after
attention (· W_UV), so attention is multi-query over the latent (keys = [latent | rope key], values = latent)
and the cache is never expanded per head. This is exact algebra; it costs more FLOPs than the expanded form for
long prefills but needs no second code path. On CUDA, steps of up to 64 tokens (decode) do the absorbed query,
both rotations, the latent's norm and the cache write in one kernel (deepfleet.kernels.mla_rope_cache).

Routing follows the Hugging Face transformers implementation, which matches the official inference code:
sigmoid scores, a correction bias used only to choose experts, groups ranked by the sum of their two best biased
scores, top-k inside the `topk_group` best groups, weights from the unbiased scores normalised
(`norm_topk_prob`) and multiplied by `routed_scaling_factor`. On CUDA the routing after the router GEMV is one
Triton kernel (deepfleet.kernels.moe_routing; CPU: `route_reference`), and the routed experts run in
deepfleet.kernels.fused_moe (sort by expert and grouped GEMMs on the device), so nothing in a
decode step waits for the host and the model is captured in CUDA graphs. Under FP8 (the published checkpoints)
every projection is block-FP8 except the router, the embeddings and lm_head, as DeepSeek ships them."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from deepfleet import quant
from deepfleet.distributed import parallel_state as ps
from deepfleet.distributed.layers import expert_inner_split, local_heads, mark_scales, shard_experts
from deepfleet.models.attention import AttentionMetadata, _kernel_attention, paged_attention, write_kv
from deepfleet.models.base import FUSED_PROJECTIONS, Backbone, CausalLM, decoder_layer_forward
from deepfleet.models.config import ModelConfig
from deepfleet.models.deepseek_mtp import MtpLayer
from deepfleet.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, _yarn_mscale, linear, silu_and_mul
from deepfleet.quant import fp8
from deepfleet.quant.linear import Fp8Linear

_EXPERT_SHARDS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}


# Pure-decode steps of at least this many sequences on CUDA attend with kernels.mla_decode (absorbed MLA, 64-head
# tiles over the latent rows) instead of the generic paged kernel (16-head tiles). H200, V3 width, bf16
# (bench/RESULTS.md "MLA decode"): mla_decode 1.21x at 256 x 512 tokens, 1.08x at 64 x 2,048, but 0.47-0.69x at
# 1-64 sequences of 512-4,096 tokens, where the generic kernel's finer split keeps more SMs busy. A captured
# graph serves every context length, so the choice is by batch size alone.
MLA_DECODE_MIN_BATCH = 256


def mla_attention(query: torch.Tensor, key: torch.Tensor | None, cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, kv_lora_rank: int) -> torch.Tensor:
    """query [T, H, kv_lora + rope] (absorbed), key [T, 1, kv_lora + rope] (latent | rope key), or None when the
    step's keys are in the cache already (CUDA) -> [T, H, kv_lora]"""
    decode_only = meta.max_query_len == 1 and not meta.prefills
    if query.is_cuda and decode_only and meta.num_decodes >= MLA_DECODE_MIN_BATCH:
        from deepfleet.kernels import mla_decode

        if mla_decode.fits(kv_lora_rank, query.shape[-1] - kv_lora_rank):
            if key is not None:
                write_kv(cache, key, meta.slot_mapping)
            n = meta.num_decodes
            return mla_decode.mla_decode(query, cache, meta.block_tables[:n], meta.context_lens[:n], scale,
                                         kv_lora_rank)
    if key is None:
        return _kernel_attention(query, None, None, cache, None, meta, scale, kv_lora_rank)
    return paged_attention(query, key, None, cache, None, meta, scale, kv_lora_rank)


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = local_heads(cfg.num_heads)  # this rank's heads; the latent cache is replicated
        self.q_lora_rank = cfg.get("q_lora_rank")
        self.kv_lora_rank = cfg.require("kv_lora_rank")
        self.nope, self.rope = cfg.require("qk_nope_head_dim"), cfg.require("qk_rope_head_dim")
        self.v_dim = cfg.require("v_head_dim")
        bias = bool(cfg.get("attention_bias", False))
        eps = cfg.get("rms_norm_eps", 1e-6)
        q_out, qk = cfg.num_heads * (self.nope + self.rope), self.nope + self.rope
        if self.q_lora_rank:
            self.q_a_proj = linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps)
            self.q_b_proj = linear(self.q_lora_rank, q_out, parallel="column", unit=qk)
        else:
            self.q_proj = linear(h, q_out, parallel="column", unit=qk)
        self.kv_a_proj_with_mqa = linear(h, self.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps)
        self.kv_b_proj = linear(self.kv_lora_rank, cfg.num_heads * (self.nope + self.v_dim), parallel="column",
                                unit=self.nope + self.v_dim)
        self.o_proj = linear(cfg.num_heads * self.v_dim, h, bias=bias, parallel="row")
        self.rotary = rotary
        scale = (self.nope + self.rope) ** -0.5
        scaling = cfg.rope_scaling or {}
        if scaling.get("mscale_all_dim"):
            scale *= _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        self.scale = scale

    def process_weights_after_loading(self, dtype: torch.dtype) -> None:
        """The absorbed form multiplies by kv_b_proj's per-head blocks, not through the layer: keep them as one
        [heads, nope + v, kv_lora] tensor in the compute dtype (a view when not quantized; dequantized once when
        FP8, then the FP8 copy is dropped: 32 MiB per layer at V3's size)."""
        if hasattr(self.kv_b_proj, "dequantized"):
            w_kv = self.kv_b_proj.dequantized(dtype)
            del self.kv_b_proj
        else:
            w_kv = self.kv_b_proj.weight
        self.register_buffer("w_kv", w_kv.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank),
                             persistent=False)

    def forward(self, rope, x, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(t, self.num_heads, self.nope + self.rope)
        kv = self.kv_a_proj_with_mqa(x)
        w_uk, w_uv = self.w_kv.split([self.nope, self.v_dim], dim=1)
        cache = kv_cache[0]
        if x.is_cuda and cache.dtype != fp8.FP8 and t <= _mla_rope_cache().MAX_TOKENS \
                and _mla_rope_cache().fits(self.nope, self.rope, self.kv_lora_rank):
            # one launch: absorbed query, its rope, the latent's norm and rope key into the cache
            query = _mla_rope_cache().mla_rope_cache(q, w_uk, kv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps,
                                                     *rope, cache, meta.slot_mapping, self.rotary.interleaved)
            out_latent = mla_attention(query, None, cache, meta, self.scale, self.kv_lora_rank)
        else:
            q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
            latent, k_rope = kv.split([self.kv_lora_rank, self.rope], dim=-1)
            latent = self.kv_a_layernorm(latent)
            q_rope, k_rope = self.rotary(rope, q_rope, k_rope.view(t, 1, self.rope))
            query = torch.cat([torch.einsum("thn,hnc->thc", q_nope, w_uk), q_rope], dim=-1)
            key = torch.cat([latent.view(t, 1, self.kv_lora_rank), k_rope], dim=-1)
            out_latent = mla_attention(query, key, cache, meta, self.scale, self.kv_lora_rank)
        out = torch.einsum("thc,hvc->thv", out_latent, w_uv)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch, one expert at a time (w13/w2 in the compute dtype): the CPU path and the fused kernel's
    reference. `tolist()` makes it sync with the host, which costs nothing on CPU. An id past the last expert
    (another rank's, under expert parallelism) is skipped."""
    out = torch.zeros_like(x)
    for expert in torch.unique(topk_ids).tolist():
        if expert >= w13.shape[0]:
            continue
        token_idx, slot = torch.where(topk_ids == expert)
        h = silu_and_mul(F.linear(x[token_idx], w13[expert]))
        h = F.linear(h, w2[expert]) * topk_weights[token_idx, slot, None].to(x.dtype)
        out.index_add_(0, token_idx, h)
    return out


class Experts(nn.Module):
    """Routed experts stacked as [E, 2I, H] (gate|up) and [E, H, I] (down): one tensor per kind, for the grouped
    GEMM of deepfleet.kernels.fused_moe (CUDA) or the per-expert reference (CPU). Under an FP8 quantization the
    stacks are FP8 with block scales [E, 2I/128, H/128] and [E, H/128, I/128]; each checkpoint tensor (weight or
    weight_scale_inv) loads into its expert's slice. Under tensor parallelism every rank holds every expert's slice
    of I; under expert parallelism a rank holds E / size whole experts (see distributed/layers.py)."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.num_experts = num_experts
        self.first, held = shard_experts(num_experts)
        self.inner_start, self.inner = expert_inner_split(inner)
        spec = quant.current()
        self.block = spec.block if spec else None
        self.from_checkpoint = bool(spec and spec.from_checkpoint)
        dtype = fp8.FP8 if spec else None
        self.w13 = nn.Parameter(torch.empty(held, 2 * self.inner, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(held, hidden, self.inner, dtype=dtype), requires_grad=False)
        self.w13_scale_inv = self.w2_scale_inv = None
        if spec:
            self.w13_scale_inv = nn.Parameter(torch.empty(held, *fp8.scale_shape(2 * self.inner, hidden, spec.block),
                                                          dtype=torch.float32), requires_grad=False)
            self.w2_scale_inv = nn.Parameter(torch.empty(held, *fp8.scale_shape(hidden, self.inner, spec.block),
                                                         dtype=torch.float32), requires_grad=False)
        mine = range(self.first, self.first + held)
        for p, shards in ((self.w13, (0, 1)), (self.w2, (None,)), (self.w13_scale_inv, (0, 1)),
                          (self.w2_scale_inv, (None,))):
            if p is None:
                continue
            p.weight_loader = self._load
            p.raw_checkpoint_tensor = spec is not None
            computed_scale = p.dtype == torch.float32 and not self.from_checkpoint
            p.expected_shards = [] if computed_scale else [(e, s) for e in mine for s in shards]
        # each rank reads (or draws) only its experts' slices; FP8 scales: those slices' blocks
        for p, shards, full in ((self.w13, (0, 1), (inner, hidden)), (self.w2, (None,), (hidden, inner))):
            p.tp_index = self._tp_index
            p.full_shards = [((e, s), full) for e in range(num_experts) for s in shards]
        if spec:
            mark_scales(self.w13, self.w13_scale_inv, spec.block)
            mark_scales(self.w2, self.w2_scale_inv, spec.block)

    def _tp_index(self, shard, full_shape: tuple[int, ...]):
        expert, half = shard
        if not self.first <= expert < self.first + self.w13.shape[0]:
            return None  # another rank's expert (or out of range: refused by _load on the rank that would hold it)
        inner = slice(self.inner_start, self.inner_start + self.inner)
        return (inner, slice(None)) if half is not None else (slice(None), inner)

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard) -> None:
        expert, half = shard
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} out of range (n_routed_experts={self.num_experts})")
        first_stack = param is self.w13 or param is self.w13_scale_inv
        weight = self.w13 if first_stack else self.w2
        row0 = 0 if half is None else half * self.inner
        local = weight.data[expert - self.first]
        rows = local if half is None else local.narrow(0, row0, self.inner)
        if self.block is None:
            if tuple(tensor.shape) != tuple(rows.shape):
                raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {tuple(rows.shape)}")
            rows.copy_(tensor)
            return
        is_scale = param.dtype == torch.float32
        if is_scale and not self.from_checkpoint:
            raise ValueError("the checkpoint has FP8 scales but no quantization_config")
        scale = (self.w13_scale_inv if first_stack else self.w2_scale_inv).data[expert - self.first]
        fp8.load_rows(rows, scale, tensor, row0, is_scale, self.block, self.from_checkpoint)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """This rank's part of the routed output (summed over the ranks by the caller)."""
        topk_ids, topk_weights = self._held(topk_ids, topk_weights)
        if x.is_cuda:
            from deepfleet.kernels.fused_moe import fused_experts

            return fused_experts(x, self.w13, self.w2, topk_ids, topk_weights, self.w13_scale_inv,
                                 self.w2_scale_inv, self.block, skip_remote=self.w13.shape[0] < self.num_experts)
        w13, w2 = self.w13, self.w2
        if self.block is not None:
            w13 = fp8.dequantize(w13, self.w13_scale_inv, self.block, x.dtype)
            w2 = fp8.dequantize(w2, self.w2_scale_inv, self.block, x.dtype)
        return experts_reference(x, w13, w2, topk_ids, topk_weights)

    def decode_candidates(self) -> list[tuple]:
        """kernels/moe_decode.py's candidate tiles that can run these expert stacks (CUDA only: imports triton)."""
        from deepfleet.kernels import moe_decode

        return [t for t in moe_decode.CANDIDATE_TILES if moe_decode.fits(t, self.w13, self.w2, self.block)]

    def decode(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, shared: nn.Module | None,
               tiles: tuple) -> torch.Tensor:
        """One row x [1, H] on CUDA: this rank's routed experts plus `shared` (the shared expert, or None) through
        kernels/moe_decode.py at `tiles`, the shared expert as its extra slot where it is a plain gated MLP with an
        expert's shapes (else added after)."""
        from deepfleet.kernels.moe_decode import moe_decode

        topk_ids, topk_weights = self._held(topk_ids, topk_weights)
        folded = self._as_slot(shared)
        out = moe_decode(x, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv, topk_ids, topk_weights,
                         self.block, tiles, shared=folded)
        return out + shared(x) if shared is not None and folded is None else out

    def _as_slot(self, shared: nn.Module | None) -> tuple | None:
        """(gate_up, its scales, down, its scales) of a shared expert the decode kernels can take as a slot: a
        gated MLP of plain (or FP8) projections without bias, with an expert's shapes and dtype."""
        if not isinstance(shared, GatedMLP):
            return None
        gate_up, down = shared.gate_up_proj, shared.down_proj
        if not all(isinstance(p, Linear | Fp8Linear) and p.bias is None for p in (gate_up, down)) \
                or (gate_up.weight.shape, down.weight.shape) != (self.w13.shape[1:], self.w2.shape[1:]) \
                or gate_up.weight.dtype != self.w13.dtype:
            return None
        return (gate_up.weight, getattr(gate_up, "weight_scale_inv", None), down.weight,
                getattr(down, "weight_scale_inv", None))

    def _held(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert parallelism: ids of the experts held here, relative to the first; a token's slot routed to another
        rank's expert gets the id `held` (one past the last local expert), which the fused kernel sorts past its
        work and the reference loop skips: no rank computes a product it throws away, and shapes stay static for
        CUDA graphs."""
        held = self.w13.shape[0]
        if held == self.num_experts:
            return ids, weights
        local = ids - self.first
        mine = (local >= 0) & (local < held)
        return local.masked_fill(~mine, held), weights


def route_reference(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                    norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped top-k routing in plain PyTorch (the CPU path and the routing kernel's reference): router logits
    [T, E] float32 -> (ids [T, top_k] int64, weights [T, top_k] float32)."""
    scores = logits.sigmoid()
    choice = scores + bias
    t, e = logits.shape
    groups = choice.view(t, n_group, -1).topk(min(2, e // n_group), dim=-1)[0].sum(-1)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(topk_group, dim=-1)[1], True)
    choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


@functools.cache
def _mla_rope_cache():
    from deepfleet.kernels import mla_rope_cache  # imports triton: only where there is a GPU

    return mla_rope_cache


@functools.cache
def _grouped_topk_kernel():
    from deepfleet.kernels.moe_routing import grouped_topk  # imports triton: only where there is a GPU

    return grouped_topk


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
        # the router multiplies in float32, as the reference does: held in float32 (the checkpoint's bf16 widens
        # exactly), so no step converts the [E, H] weight again
        self.gate.weight = nn.Parameter(torch.empty(self.num_experts, h, dtype=torch.float32), requires_grad=False)
        # the correction bias only ranks experts; kept in float32 as the reference does
        self.gate.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts, dtype=torch.float32),
                                                         requires_grad=False)
        self.experts = Experts(self.num_experts, h, inner)
        n_shared = cfg.get("n_shared_experts") or 0
        # partial sums like the routed experts: one all-reduce adds both (expert_combine)
        self.shared_experts = GatedMLP(h, inner * n_shared, reduce=False) if n_shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (expert ids [T, k], weights [T, k] float32): on CUDA one Triton kernel
        (deepfleet.kernels.moe_routing, int32 ids) after the router GEMV; on CPU the plain-PyTorch reference."""
        logits = F.linear(x.float(), self.gate.weight)
        args = (self.gate.e_score_correction_bias, self.n_group, self.topk_group, self.top_k, self.norm_topk_prob,
                self.scaling)
        if logits.is_cuda:
            return _grouped_topk_kernel()(logits, *args)
        return route_reference(logits, *args)

    # batch-1 tiles of kernels/moe_decode.py (routed and shared experts in two launches, no sort by expert), or
    # None (kernels/fused_moe.py's grouped path): set per model by models/layers.py choose_gemv where start-up
    # timing found them faster
    one_row_tiles: tuple | None = None

    @property
    def in_features(self) -> int:
        return self.gate.weight.shape[1]

    def one_row_candidates(self) -> list[tuple]:
        return self.experts.decode_candidates()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        if self.one_row_tiles is not None and x.is_cuda and x.shape[0] == 1:
            return ps.all_reduce(self.experts.decode(x, ids, weights, self.shared_experts, self.one_row_tiles))
        out = self.experts(x, ids, weights)
        return ps.all_reduce(out + self.shared_experts(x) if self.shared_experts is not None else out)


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
    cuda_graph_safe = True  # routing and the fused MoE stay on the device (no host sync)

    def __init__(self, cfg: ModelConfig, max_positions: int, mtp_layers: int = 0):
        """`mtp_layers`: multi-token-prediction layers to build (speculative decoding's draft); 0 skips them."""
        rope_dim = cfg.require("qk_rope_head_dim")
        rotary = RotaryEmbedding(rope_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                                 interleaved=cfg.get("rope_interleave", True))
        super().__init__(cfg, Backbone(cfg, DecoderLayer, rotary))
        self.kv_lora_rank, self.rope_dim = cfg.require("kv_lora_rank"), rope_dim
        self.mtp = nn.ModuleList([MtpLayer(cfg, cfg.num_layers + i, rotary, DecoderLayer) for i in range(mtp_layers)])

    def kv_cache_layout(self) -> tuple[int, int, int | None]:
        return 1, self.kv_lora_rank + self.rope_dim, None  # values are the latent part of the cached keys

    def param_for(self, name: str) -> tuple[str, object] | None:
        parts = name.split(".")
        if "layers" in parts and (layer := int(parts[parts.index("layers") + 1])) >= self.cfg.num_layers:
            # multi-token-prediction layers (model.layers.61 in V3): loaded only when speculation drafts with them
            if layer - self.cfg.num_layers >= len(self.mtp):
                return None
            parts = ["mtp", str(layer - self.cfg.num_layers), *parts[parts.index("layers") + 2 :]]
            name = ".".join(parts)
        if "experts" in parts:
            i = parts.index("experts")
            if i + 3 < len(parts) and parts[i + 1].isdigit() and parts[i + 2] in _EXPERT_SHARDS:
                stacked, half = _EXPERT_SHARDS[parts[i + 2]]
                suffix = {"weight": "", "weight_scale_inv": "_scale_inv"}.get(parts[i + 3])
                if suffix is not None:
                    return ".".join([*parts[: i + 1], stacked + suffix]), (int(parts[i + 1]), half)
        return super().param_for(name)
