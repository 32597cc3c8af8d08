"""DeepSeek-V3's grouped top-k routing (`noaux_tc`) as one Triton kernel, one program per token: router logits
[T, E] -> (expert ids [T, k] int32, routing weights [T, k] float32).

The steps are those of the plain-PyTorch reference (models/deepseek_v3.py `route_reference`), which take ~19 launches
per MoE layer: sigmoid scores; biased scores (+ e_score_correction_bias) used only to choose; each group scored by
the sum of its two best biased scores; the `topk_group` best groups kept; the k best biased scores inside them
chosen; the weights are the chosen experts' unbiased scores, normalised to sum 1 (`norm_topk_prob`, with the
reference's + 1e-20) and multiplied by `routed_scaling_factor`. A token's E scores are one [groups, per group] tile
(V3: 8 x 32), so every selection is a max and an index-min over registers.

Ties: among equal scores the lower index wins (group index for groups, expert index for experts), and ids come out
best first. torch.topk leaves the order of equal values unspecified; on real-valued scores ties do not occur, and
there the output equals the reference's (same ids in the same order)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, stride_l, scaling,
                         E: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
                         NORM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    PER: tl.constexpr = E // GROUPS
    group = tl.arange(0, BLOCK_G)
    col = tl.arange(0, BLOCK_P)[None, :]
    valid = (group[:, None] < GROUPS) & (col < PER)
    expert = group[:, None] * PER + col
    score = tl.sigmoid(tl.load(logits_ptr + row * stride_l + expert, mask=valid, other=0.0).to(tl.float32))
    choice = tl.where(valid, score + tl.load(bias_ptr + expert, mask=valid, other=0.0), float("-inf"))
    # group score: its best biased score plus its second best (the best's first position taken out)
    best = tl.max(choice, axis=1)
    if PER > 1:
        first = tl.min(tl.where(choice == best[:, None], col, BLOCK_P), axis=1)
        best += tl.max(tl.where(col == first[:, None], float("-inf"), choice), axis=1)
    group_score = tl.where(group < GROUPS, best, float("-inf"))
    kept = group < 0
    for _ in tl.static_range(TOPK_GROUP):
        pick = tl.min(tl.where(group_score == tl.max(group_score, axis=0), group, BLOCK_G), axis=0)
        kept |= group == pick
        group_score = tl.where(group == pick, float("-inf"), group_score)
    choice = tl.where(kept[:, None], choice, float("-inf"))
    # the k best experts of the kept groups, best first: rank[e] = its place in the output (TOP_K: not chosen)
    rank = tl.full([BLOCK_G, BLOCK_P], TOP_K, tl.int32)
    candidate = tl.where(valid, expert, E)
    for i in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(choice == top, candidate, E), axis=1), axis=0)
        hit = expert == pick
        rank = tl.where(hit, i, rank)
        choice = tl.where(hit, float("-inf"), choice)
    chosen = rank < TOP_K
    weight = tl.where(chosen, score, 0.0)
    if NORM:
        weight = weight / (tl.sum(tl.sum(weight, axis=1), axis=0) + 1e-20)
    tl.store(ids_ptr + row * TOP_K + rank, expert, mask=chosen)
    tl.store(weights_ptr + row * TOP_K + rank, weight * scaling, mask=chosen)


def grouped_topk(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
                 norm_topk_prob: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 (rows contiguous), bias [E] float32 -> (ids [T, top_k] int32, weights [T, top_k]
    float32)."""
    t, e = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1 or bias.shape != (e,) or bias.dtype != torch.float32:
        raise ValueError(f"grouped_topk: expected float32 logits [T, E] with contiguous rows and a float32 bias [E], "
                         f"got {logits.dtype} {tuple(logits.shape)} and {bias.dtype} {tuple(bias.shape)}")
    if e % n_group or not 1 <= topk_group <= n_group or not 1 <= top_k <= topk_group * (e // n_group):
        raise ValueError(f"grouped_topk: {e} experts in {n_group} groups cannot give top-{top_k} from "
                         f"{topk_group} groups")
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    if t:
        _grouped_topk_kernel[(t,)](
            logits, bias.contiguous(), ids, weights, logits.stride(0), scaling,
            E=e, GROUPS=n_group, TOPK_GROUP=topk_group, TOP_K=top_k, NORM=norm_topk_prob,
            BLOCK_G=triton.next_power_of_2(n_group), BLOCK_P=triton.next_power_of_2(e // n_group), num_warps=4,
        )
    return ids, weights
