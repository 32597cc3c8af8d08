"""MTP drafts (DeepSeek-V3/R1): after each step's tokens are accepted, the MTP layer (models/deepseek_mtp.py) runs
over every position the target computed and kept, so its own latent KV cache stays complete, and the last
position of each decoding sequence yields the first draft; further drafts chain the MTP layer's output hidden
state and its previous draft one position on.

Inputs per sequence: the rows of the target's hidden states in the last step (ModelRunner.step_hidden, token
order), the first position and how many positions were kept, the token that follows each of them (x_{p+1}: the
next prompt token, an accepted draft or the step's new token), the block table, and how many drafts to make.
The MTP layer's KV slot of position p comes from the same block table as the target's. Chained drafts write
provisional KV at the next positions, which the next step's pass overwrites with the real tokens' (the engine
allocates those blocks before asking).

A prefix-cache hit reuses the blocks' MTP KV too; its last slot was computed with the token that followed the
block in the request that filled it, which may differ from the new request's: that may only lower acceptance,
never change the output (verification is exact). Runs eagerly (no CUDA graph)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepfleet.models.attention import AttentionMetadata


@dataclass
class MtpRequest:
    hidden_row: int  # first row of this sequence in the last step's hidden states
    start: int  # position of that row
    count: int  # rows (positions) kept
    next_tokens: list[int]  # x_{p+1} for each kept position p
    block_table: list[int]
    num_drafts: int  # 0: only fill the MTP KV cache (a prompt chunk, or no room to speculate)


def _meta(runner, tables: list[list[int]], positions: list[list[int]], context: list[int],
          decode: bool) -> AttentionMetadata:
    device, bs = runner.device, runner.block_size
    width = max(len(t) for t in tables)
    table = torch.full((len(tables), width), runner.scratch_block, dtype=torch.int32)
    slots = []
    for i, (t, pos) in enumerate(zip(tables, positions, strict=True)):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        slots += [t[p // bs] * bs + p % bs for p in pos]
    lens = [len(p) for p in positions]
    starts = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return AttentionMetadata(
        num_decodes=len(tables) if decode else 0, slot_mapping=torch.tensor(slots, device=device),
        context_lens=torch.tensor(context, dtype=torch.int32, device=device), block_tables=table.to(device),
        block_size=bs, prefills=[] if decode else list(zip(lens, context, strict=True)),
        query_start_loc=starts.to(device), max_query_len=max(lens))


@torch.inference_mode()
def propose(runner, requests: list[MtpRequest]) -> list[list[int]]:
    """Drafts per request (empty for those that asked for none)."""
    if not requests:
        return []
    layer, cache = runner.model.mtp[0], runner.draft_kv_caches[0]
    device = runner.device
    rows = torch.cat([torch.arange(r.hidden_row, r.hidden_row + r.count) for r in requests]).to(device)
    positions = [list(range(r.start, r.start + r.count)) for r in requests]
    ids = torch.tensor([t for r in requests for t in r.next_tokens], device=device)
    meta = _meta(runner, [r.block_table for r in requests], positions, [r.start + r.count for r in requests], False)
    hidden = layer(runner.step_hidden[rows], ids, torch.tensor([p for ps in positions for p in ps], device=device),
                   cache, meta)
    drafts: list[list[int]] = [[] for _ in requests]
    asking = [i for i, r in enumerate(requests) if r.num_drafts]
    if not asking:
        return drafts
    ends = torch.tensor([0, *[r.count for r in requests]]).cumsum(0)[1:] - 1
    hidden = hidden[ends[asking].to(device)]
    token = layer.compute_logits(hidden).argmax(dim=-1)
    for j in range(max(requests[i].num_drafts for i in asking)):
        if j:  # chain: the previous draft at the next position, on the MTP layer's own hidden state
            keep = [n for n, i in enumerate(asking) if requests[i].num_drafts > j]
            if len(keep) < len(asking):
                index = torch.tensor(keep, device=device)
                asking, hidden, token = [asking[n] for n in keep], hidden[index], token[index]
            pos = [requests[i].start + requests[i].count + j - 1 for i in asking]
            meta = _meta(runner, [requests[i].block_table for i in asking], [[p] for p in pos], [p + 1 for p in pos],
                         True)
            hidden = layer(hidden, token, torch.tensor(pos, device=device), cache, meta)
            token = layer.compute_logits(hidden).argmax(dim=-1)
        for i, t in zip(asking, token.tolist(), strict=True):
            drafts[i].append(t)
    return drafts
