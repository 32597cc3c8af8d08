"""Paged attention in Triton: one varlen kernel over the flattened token batch that reads the KV cache through the
block tables, for decode rows, prefill chunks over cached (chunked or prefix-hit) context, and any mix of the two in
one launch.

Layout. The batch is flattened: sequence `s` owns query rows `query_start_loc[s] : query_start_loc[s + 1]`, has
`seq_lens[s]` tokens in the cache after this step (its new keys already written), so query row `i` of the chunk
sits at position `seq_lens[s] - query_len + i` and sees keys `0 … that position`. Caches are
`[num_blocks, block_size, kv_heads, dim]`; when there is no value cache (MLA's compressed cache), values are the
first `v_dim` features of the keys and are read from the key cache.

Design, and why (after reading vLLM's unified Triton attention, SGLang's Triton decode/extend kernels and
FlashInfer's paged kernels):
- One kernel for every row kind, as vLLM's unified attention: a program owns a tile of up to BLOCK_Q query rows of
  one sequence and finds its sequence by binary search over `query_start_loc` (the grid is an upper bound of the
  tiles, `T // BLOCK_Q + num_seqs`; surplus programs exit). SGLang instead runs separate decode and extend kernels,
  and its extend kernel reads the new keys from a separate buffer; one kernel over the cache after the KV write
  needs neither, and a mixed step is one launch per layer. A pure-decode launch (`max_query_len == 1`) maps program
  to sequence directly and skips the search.
- GQA: the M dimension of a tile is (query row × query head of the group), so each KV head is loaded once per tile
  for its whole group (vLLM and SGLang do the same). Groups larger than HEADS_PER_PROG (MLA: 16-128 heads on one
  latent head) are split over programs, as SGLang's grouped decode does, to bound registers; that re-reads the
  latent cache once per head block, which is correct, not optimal: the dedicated absorbed-MLA decode kernel is
  separate work.
- Split KV (flash-decoding): when the launch has too few programs for the GPU (batch 1 at long context), the KV
  range is cut into `num_splits` parts that write partial outputs and their log-sum-exp; the split program that
  finishes a (tile, head block) last, by an atomic arrival counter (kernels/workspace.py, reset by that program),
  merges the splits that had keys, in the same launch (a second merge launch took as long as the attention
  kernel at batch 1: 4.7-5.2 us per layer on the H200).
  The split count comes from the launch shape only (programs vs SMs, block-table width) and each split takes an even
  share of the sequence's *actual* length, read on the device, of at least `Tiling.min_split_tiles` KV tiles. So the
  launch is CUDA-graph capturable with no host sync (FlashInfer plans its split on the host from the lengths, which
  a replayed graph cannot redo per step). Splits beyond a sequence's share exit at once, without arriving; a
  sequence that needs one split only writes its output directly, with no partials and no merge.
- Tiles (`choose_tiling`, measured on the H200): Triton's software pipeliner spends one stage on the block-id load
  that addresses the K/V gather, so num_stages 2-4 keep one K/V tile in flight per program and 5 keeps two. A
  large decode batch (no split) runs 32-key tiles, 4 warps, 5 stages; other launches 64-key tiles, 3 stages.
- Key dims that are not a power of two are split into a power-of-two main part and a power-of-two tail
  (576 = 512 + 64 for MLA, as SGLang's BLOCK_DPE; 40 = 32 + 8, padded to 16, the smallest tl.dot), each its own dot
  product, rather than padding 576 to 1024. Value dims are padded to a power of two and masked.
- The KV tile (TILE_N keys) is independent of the cache block size: each key's block id is looked up in the block
  table, so any block size works and the block tables can be in any order. Keys and values are both loaded as
  [TILE_N, dim] (tokens in rows, as in the cache), so one block-id load addresses both.
- float32 caches (the GPU parity tests) use IEEE dot products, not TF32, so they match the float32 reference.
- FP8 caches (engine.kv_cache_dtype fp8: half the bytes per token) store k / k_scale and v / v_scale in e4m3 with
  float32 scales per KV head; a tile is widened to the query's dtype after its load, k_scale folds into the
  softmax scale and v_scale into the output, so the inner loop does no extra multiply."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deepfleet.kernels import pdl, workspace

# flash-decoding parts per sequence: batch 1 at 8k context on an H200 took 14.7 us at 32, 16.7 at 64, 24.1 at 128
MAX_SPLITS = 32
PROGRAMS_PER_SM = 4  # split until the launch has about this many programs per SM


@triton.jit
def _find_sequence(query_start_loc, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles contain `tile`: sequence s owns tiles query_start_loc[s] // BLOCK_Q + s …"""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Per-launch sizes are not specialized on (Triton compiles a variant per "== 1" / "% 16 == 0" class of each int
# argument): eager prefill steps vary them from step to step, and each new class would be a compile mid-serving.
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "stride_ps"])
def _paged_attention_kernel(
    out, part_out, part_lse, counters,  # out [T, H, DV]; parts [num_splits, T, H, DV] fp32 and [num_splits, T, H]
    # fp32; counters: int32 per (tile, program along axis 1), zero between launches
    q, k_cache, v_cache, k_scale, v_scale,  # scales: float32 per KV head of an FP8 cache (FP8_KV), else unused
    block_tables, seq_lens, query_start_loc,
    num_seqs, num_splits, min_split_tiles, qk_scale,  # qk_scale: softmax scale times log2(e) (base 2)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ps, stride_pt, stride_ph,
    GROUP: tl.constexpr, HEADS_PER_PROG: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    K_DIM: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr, ONE_ROW_PER_SEQ: tl.constexpr,
    PRECISION: tl.constexpr, FP8_KV: tl.constexpr, PDL: tl.constexpr,
):
    pdl.enter(PDL)  # all it reads is the step's: q, the cache (new keys just written), tables, lengths
    tile = tl.program_id(0)
    HEAD_BLOCKS: tl.constexpr = (GROUP + HEADS_PER_PROG - 1) // HEADS_PER_PROG
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    head_block = tl.program_id(1) % HEAD_BLOCKS
    split = tl.program_id(2)

    if ONE_ROW_PER_SEQ:
        seq = tile
        q_tile = 0
    else:
        seq = _find_sequence(query_start_loc, tile, num_seqs, BLOCK_Q)
        q_tile = tile - (tl.load(query_start_loc + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + seq)
    cached_before = seq_len - q_len

    # rows of the tile: (query row, head of the group), heads fastest
    m = tl.arange(0, BLOCK_M)
    q_row = q_tile * BLOCK_Q + m // HEADS_PER_PROG
    head_in_group = head_block * HEADS_PER_PROG + m % HEADS_PER_PROG
    row_ok = (m < BLOCK_Q * HEADS_PER_PROG) & (q_row < q_len) & (head_in_group < GROUP)
    head = kv_head * GROUP + head_in_group
    token = (q_start + q_row).to(tl.int64)
    q_pos = cached_before + q_row  # this row sees keys 0 … q_pos

    d = tl.arange(0, D_MAIN)
    q_ptrs = q + token[:, None] * stride_qt + head[:, None] * stride_qh
    q_main = tl.load(q_ptrs + d[None, :], mask=row_ok[:, None] & (d < K_DIM)[None, :], other=0.0)
    if D_TAIL > 0:
        d_tail = D_MAIN + tl.arange(0, D_TAIL)
        q_tail = tl.load(q_ptrs + d_tail[None, :], mask=row_ok[:, None] & (d_tail < K_DIM)[None, :], other=0.0)
    dv = tl.arange(0, DV_PAD)

    # keys this tile needs (causal), and this split's share of them in whole KV tiles: an even share of the
    # sequence's actual length, at least `min_split_tiles`, so a short sequence in a launch of many splits uses few
    kv_end = tl.minimum(seq_len, cached_before + (q_tile + 1) * BLOCK_Q)
    num_tiles = (kv_end + TILE_N - 1) // TILE_N
    per_split = tl.maximum((num_tiles + num_splits - 1) // num_splits, min_split_tiles)
    used_splits = tl.maximum((num_tiles + per_split - 1) // per_split, 1)
    if split >= used_splits:
        return
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    if FP8_KV:  # stored keys are k / k_scale: the scale folds into the softmax scale, v_scale into the output
        qk_scale = qk_scale * tl.load(k_scale + kv_head)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    table = block_tables + seq * stride_bt
    for j in range(first, last):
        # keys and values as [TILE_N, dim], tokens in rows as in the cache: one block-id load serves both
        pos = j * TILE_N + tl.arange(0, TILE_N)
        in_range = pos < kv_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k_ptrs = k_cache + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
        if D_MAIN > K_DIM:  # head dims below 16, the smallest tl.dot
            k_main = tl.load(k_ptrs + d[None, :], mask=in_range[:, None] & (d < K_DIM)[None, :], other=0.0)
        else:
            k_main = tl.load(k_ptrs + d[None, :], mask=in_range[:, None], other=0.0)
        if FP8_KV:
            k_main = k_main.to(q_main.dtype)
        s = tl.dot(q_main, tl.trans(k_main), input_precision=PRECISION)
        if D_TAIL > 0:
            k_tail = tl.load(k_ptrs + d_tail[None, :], mask=in_range[:, None] & (d_tail < K_DIM)[None, :], other=0.0)
            if FP8_KV:
                k_tail = k_tail.to(q_tail.dtype)
            s += tl.dot(q_tail, tl.trans(k_tail), input_precision=PRECISION)
        visible = row_ok[:, None] & in_range[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_cache + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
        v = tl.load(v_ptrs + dv[None, :], mask=in_range[:, None] & (dv < DV)[None, :], other=0.0)
        if FP8_KV:
            v = v.to(q_main.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8_KV:
        result = result * tl.load(v_scale + kv_head)
    store_mask = row_ok[:, None] & (dv < DV)[None, :]
    if used_splits == 1:  # the whole KV range in this program: no partials, no merge
        o_ptrs = out + token[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, result.to(out.dtype.element_ty), mask=store_mask)
    elif SPLIT:
        part = split * stride_ps + token * stride_pt + head * stride_ph
        tl.store(part_out + part[:, None] * DV + dv[None, :], result, mask=store_mask)
        tl.store(part_lse + part, m_i + tl.log2(l_i), mask=row_ok)
        # every thread's partial stored before the arrival (barrier), which releases them to the last program
        # (acq_rel), whose loads then see the other splits' (.cg: from L2, not a stale L1); only the splits that
        # had keys arrive
        counter = counters + tile * tl.num_programs(1) + tl.program_id(1)
        tl.debug_barrier()
        if tl.atomic_add(counter, 1, sem="acq_rel") == used_splits - 1:
            tl.store(counter, 0)  # ready for the next launch
            # out = sum_s 2^lse_s part_s / sum_s 2^lse_s: the exact softmax
            m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_all = tl.zeros([BLOCK_M], tl.float32)
            o_all = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
            for s_i in range(0, used_splits):
                part = s_i * stride_ps + token * stride_pt + head * stride_ph
                lse = tl.load(part_lse + part, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                o = tl.load(part_out + part[:, None] * DV + dv[None, :], mask=store_mask, other=0.0,
                            cache_modifier=".cg")
                m_new = tl.maximum(m_all, lse)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                w_old = tl.exp2(m_all - m_ref)
                w = tl.exp2(lse - m_ref)
                o_all = o_all * w_old[:, None] + o * w[:, None]
                l_all = l_all * w_old + w
                m_all = m_new
            merged = o_all / tl.where(l_all > 0, l_all, 1.0)[:, None]
            o_ptrs = out + token[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :]
            tl.store(o_ptrs, merged.to(out.dtype.element_ty), mask=store_mask)


@dataclass(frozen=True)
class Tiling:
    tile_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int  # Triton's software pipelining depth (the block-id load takes one stage, K/V the rest)
    splits: int | None = None  # flash-decoding parts per sequence; None: enough to fill the GPU (at most MAX_SPLITS)
    min_split_tiles: int = 1  # a split covers at least this many KV tiles (fewer, longer splits: less merging)


def choose_tiling(decode: bool, wide: bool, fp32: bool, programs: int, sms: int) -> Tiling:
    """The loop's tile and the split limits for a launch shape (host values only: graph capturable, so one choice
    serves every context length the captured batch will see). H200, 7B decode layer, bf16 (bench/RESULTS.md
    "decode tiling"): once the batch alone fills the GPU (no split), 32-key tiles, 4 warps, 5 stages (two K/V tiles
    in flight) took 29.2 / 49.4 / 86.3 us at 256 x 138, 512 x 138, 256 ShareGPT-like contexts (mean 382) against
    30.8 / 55.4 / 90.3 for 64-key tiles, 3 stages (main's kernel before: 33.6 / 59.2 / 94.6); 16-key tiles with 2
    warps were faster on short contexts (24.7-25.8 / 45.5 us) but 1.3-1.7x slower on the long-tailed mix, so they
    are not used."""
    if wide:
        return Tiling(32, 4, 2)
    if fp32:
        return Tiling(32, 4 if decode else 8, 2)
    if decode and programs >= PROGRAMS_PER_SM * sms:
        return Tiling(32, 4, 5)
    return Tiling(64, 4 if decode else 8, 3)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    v_dim: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    num_splits: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """q [T, H, Dk] -> [T, H, v_dim]. Caches [num_blocks, block_size, kv_heads, dim] (v_cache None: values are the
    first v_dim features of the keys); block_tables [B, W] int32, seq_lens [B] int32 (tokens in the cache after this
    step), query_start_loc [B + 1] int32, all on q's device. `max_query_len` (host) only chooses the tile shape: 1
    selects the decode launch. `num_splits` overrides the flash-decoding split (tests, benchmarks). An FP8
    (float8_e4m3fn) cache holds k / k_scale and v / v_scale with float32 scales per KV head (`k_scale`, `v_scale`
    [kv_heads]; v_scale unused without a value cache, whose values are keys): tiles are widened to q's dtype.
    `tiling` overrides choose_tiling (benchmarks)."""
    num_tokens, num_heads, k_dim = q.shape
    _, block_size, kv_heads, cache_k_dim = k_cache.shape
    if cache_k_dim != k_dim or num_heads % kv_heads:
        raise ValueError(f"query [{num_tokens}, {num_heads}, {k_dim}] does not fit the key cache "
                         f"{tuple(k_cache.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or (v_cache is not None and v_cache.stride(-1) != 1):
        raise ValueError("paged_attention: the feature dimension of q and the caches must be contiguous")
    num_seqs = seq_lens.shape[0]
    group = num_heads // kv_heads
    out = q.new_empty(num_tokens, num_heads, v_dim)
    if num_tokens == 0:
        return out
    values = k_cache if v_cache is None else v_cache
    fp8_kv = k_cache.dtype == torch.float8_e4m3fn
    if fp8_kv:
        if k_scale is None or (v_cache is not None and v_scale is None):
            raise ValueError("paged_attention: an FP8 KV cache needs its k_scale (and v_scale) per KV head")
        if v_cache is None:
            v_scale = k_scale

    wide = k_dim > 256  # MLA's 576: smaller tiles keep the loaded keys and the accumulator in registers/shared memory
    heads_per_prog = min(triton.next_power_of_2(group), 16 if wide else 64)
    decode = max_query_len == 1
    fp32 = q.element_size() > 2  # float32 (the parity tests): half the tile to stay within shared memory
    if decode:
        block_q, tiles = 1, num_seqs
    else:
        block_q = max(1, (32 if wide else 64 if fp32 else 128) // heads_per_prog)
        tiles = num_tokens // block_q + num_seqs
    block_m = max(16, block_q * heads_per_prog)  # tl.dot needs M >= 16; surplus rows are masked
    d_main = max(16, _pow2_floor(k_dim))  # tl.dot needs every dimension >= 16: smaller parts are padded, masked
    d_tail = 0 if d_main >= k_dim else max(16, triton.next_power_of_2(k_dim - d_main))
    dv_pad = max(16, triton.next_power_of_2(v_dim))
    head_blocks = triton.cdiv(group, heads_per_prog)
    programs = tiles * kv_heads * head_blocks
    sms = _sm_count(q.device.index or 0) if q.is_cuda else 2  # CPU: Triton's interpreter (tests)
    plan = tiling or choose_tiling(decode, wide, fp32, programs, sms)
    if num_splits is None:
        most = triton.cdiv(block_tables.shape[1] * block_size, plan.tile_n)  # KV tiles of the longest context
        fill = min(MAX_SPLITS, triton.cdiv(PROGRAMS_PER_SM * sms, programs))
        num_splits = max(1, min(most, plan.splits or fill))
    if num_splits > 1:
        part_out = torch.empty(num_splits, num_tokens, num_heads, v_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
        counters = workspace.buffer(q.device, "paged attention counters", programs, torch.int32)
    else:
        part_out = part_lse = counters = out  # unused

    _paged_attention_kernel[(tiles, kv_heads * head_blocks, num_splits)](
        out, part_out, part_lse, counters, q, k_cache, values, k_scale if fp8_kv else q, v_scale if fp8_kv else q,
        block_tables, seq_lens, query_start_loc,
        num_seqs, num_splits, plan.min_split_tiles, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), values.stride(0), values.stride(1), values.stride(2),
        block_tables.stride(0), num_tokens * num_heads, num_heads, 1,
        GROUP=group, HEADS_PER_PROG=heads_per_prog, BLOCK_Q=block_q, BLOCK_M=block_m,
        K_DIM=k_dim, D_MAIN=d_main, D_TAIL=d_tail, DV=v_dim, DV_PAD=dv_pad,
        BLOCK_SIZE=block_size, TILE_N=plan.tile_n, SPLIT=num_splits > 1, ONE_ROW_PER_SEQ=decode,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8_KV=fp8_kv, PDL=(on := pdl.enabled(q)),
        num_warps=plan.num_warps, num_stages=plan.num_stages, **pdl.launch_options(on),
    )
    return out
