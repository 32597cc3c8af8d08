"""Runs the model for one scheduled batch and returns the logits of the sequences whose last token was computed.

Inputs live in persistent buffers (engine/input_buffers.py): each step fills pinned staging on the host and copies
it asynchronously, so the host can prepare step N+1 while the GPU still runs step N. A decode row whose input
token was sampled by the previous step, and is not yet known on the host, reads it on the device from that step's
sampled-token tensor (`prev_token_ids`).

On CUDA, both passes of a step replay CUDA graphs captured at start-up (an eager pass of a 28-layer model costs
~25 ms of kernel launches on the host, more than the GPU needs for a 512-token prompt):
- decodes: a ladder of batch sizes (1, 2, 4, 8, then steps of 8 to 64, of 16 to 256 and of 32 beyond, up to
  max_num_seqs), LM head included, reading the full-width block tables (the paged-attention kernel reads only the
  blocks a sequence has);
- prefill chunks: token-count buckets (16, 32, … up to PREFILL_GRAPH_MAX_TOKENS) for up to PREFILL_GRAPH_MAX_SEQS
  chunks. The chunks' tokens are padded to the bucket with tokens that belong to no sequence (the attention kernel
  skips them, their keys go to the scratch slot, their rows are never read) and the chunk list to the graph's
  sequence count with empty chunks; the LM head runs eagerly on the rows that are sampled.
Before the capture, each projection shape's batch-1 product is timed through cuBLAS and through the Triton GEMV
(models/layers.py choose_gemv) and the faster is what the batch-1 graph captures. Prefill passes outside the
buckets run eagerly; a pass of long chunks only (LONG_PREFILL_TOKENS) attends with
torch SDPA (models/attention.py). The prefill rows sit at a fixed offset in the buffers (after the largest decode
batch), so a prefill graph reads the same addresses whatever the step's decode count. CPU takes the same split
(eagerly) so the tests cover it.

With LoRA on (max_loras > 0) the projections carry adapter slots (deepfleet/lora/) and every token's slot is
staged and uploaded beside its position (a prefill graph's padding tokens take the "no adapter" slot); without it
nothing of that runs."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from deepfleet import defaults
from deepfleet.engine import memory
from deepfleet.engine.errors import StartupError
from deepfleet.engine.input_batch import InputBatch
from deepfleet.engine.input_buffers import InputBuffers
from deepfleet.engine.sampler import to_device
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.scheduler import SchedulerOutput
from deepfleet.engine.sequence import Sequence
from deepfleet.lora.layers import set_token_slots
from deepfleet.lora.manager import LoRAManager
from deepfleet.models.attention import AttentionMetadata
from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import choose_gemv, use_fused_kernels
from deepfleet.models.loader import load_model
from deepfleet.quant import kv_cache

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256 and every 32 beyond, capped at (and including)
    max_batch: 47 graphs at 1024 (padding a batch costs at most 1/8 of its rows above 256, 3% at 1024)."""
    ladder = [1, 2, 4, *range(8, 65, 8), *range(80, 257, 16), *range(288, max_batch + 32, 32)]
    return sorted({min(b, max_batch) for b in ladder})


def prefill_token_buckets(max_tokens: int = defaults.PREFILL_GRAPH_MAX_TOKENS) -> list[int]:
    """16, 32, 64, 128, 256, 512, then every 256 up to 1024 and every 512 beyond, up to max_tokens."""
    ladder = [16, 32, 64, 128, 256, 512, 768, *range(1024, max_tokens + 1, 512)]
    return [t for t in ladder if t <= max_tokens]


def _copy_rows(tab: np.ndarray, tables: list[np.ndarray]) -> None:
    """tables[i] into the first len(tables[i]) entries of row i of tab, as one scatter (no copy per row)."""
    if not tables:
        return
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    starts = np.cumsum(lens) - lens  # where each table begins in the concatenation
    within = np.arange(int(lens.sum())) - np.repeat(starts, lens)
    tab.reshape(-1)[np.repeat(np.arange(len(tables)) * tab.shape[1], lens) + within] = np.concatenate(tables)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 block_size: int, enforce_eager: bool, load_format: str = "auto", quantization: str | None = None,
                 max_loras: int = 0, max_lora_rank: int = 0, mtp_layers: int = 0,
                 kv_cache_dtype: str = defaults.KV_CACHE_DTYPE):
        """`mtp_layers`: also build DeepSeek-V3's multi-token-prediction layers (speculative drafts,
        spec_decode/mtp.py): they get KV caches of their own, and steps keep the target's hidden states for them."""
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.cache_dtype = kv_cache.cache_dtype(kv_cache_dtype, dtype, cfg.raw, device)  # refused before loading
        self.block_size, self.max_model_len = block_size, max_model_len
        self.model = load_model(cfg, dtype, device, max_positions=max(max_model_len, cfg.max_position_embeddings),
                                load_format=load_format, quantization=quantization, mtp_layers=mtp_layers)
        self.num_draft_layers = len(getattr(self.model, "mtp", ()))
        self.draft_kv_caches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.step_hidden: torch.Tensor | None = None  # with MTP: the last step's hidden states, in token order
        self.kv_heads, self.k_dim, self.v_dim = self.model.kv_cache_layout()
        self.lora = LoRAManager(self.model, max_loras, max_lora_rank) if max_loras else None
        self.has_v_cache = self.v_dim is not None  # None: values are part of the cached keys (MLA)
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        # MTP drafts read every token's hidden state, which the decode graphs do not keep: eager (for now)
        self.use_graphs = (device.type == "cuda" and not enforce_eager and getattr(self.model, "cuda_graph_safe", True)
                           and not self.num_draft_layers)
        use_fused_kernels(device.type == "cuda" and not enforce_eager)
        # per layer: (k_cache, v_cache or None) or, for an FP8 cache, (k_cache, v_cache, k_scale, v_scale)
        self.kv_caches: list[tuple] = []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # batch size -> (graph, logits)
        self.graph_batch_sizes: list[int] = []
        self.graph_max_batch = 0  # set by init_graphs once max_num_seqs is known
        # prefill token bucket -> (graph, hidden states [bucket, hidden]); graphs hold PREFILL_GRAPH_MAX_SEQS chunks
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_buckets: list[int] = []
        self.prefill_graph_seqs = defaults.PREFILL_GRAPH_MAX_SEQS
        self.buffers: InputBuffers | None = None
        self.batch = InputBatch(self.max_blocks_per_seq)  # the requests' block tables, updated by delta
        # prompt logprobs of the last step's prefill chunks: (sequence, index of the first prompt token they score,
        # device tensors: the tokens' logprobs, ranks, top ids, top logprobs); the engine takes them after execute
        self.prompt_logprobs: list[tuple[Sequence, int, tuple[torch.Tensor, ...]]] = []
        # the last step's sampled sequences (their last token computed), in the order of execute's logits rows
        self.sampled: list[Sequence] = []

    # ---- KV cache -------------------------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        layers = self.cfg.num_layers + self.num_draft_layers
        return memory.kv_block_bytes((self.kv_heads, self.k_dim, self.v_dim), layers, self.block_size,
                                     self.cache_dtype.itemsize)

    def profile_kv_budget(self, max_num_batched_tokens: int, memory_utilization: float) -> int:
        """GPU: run the largest prefill once to measure activation memory; returns the bytes left for KV blocks
        (engine/memory.py), before the sampler's share that depends on max_num_seqs."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        n = min(max_num_batched_tokens, self.max_model_len)
        blocks = math.ceil(n / self.block_size)
        self.allocate_kv_cache(blocks)
        self._init_buffers(max_rows=2, max_tokens=n + 1)
        seq = Sequence("profile", None, [0] * n, SamplingParams())
        seq.block_table = list(range(blocks))
        self.execute(SchedulerOutput(scheduled=[(seq, n)]))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        # the prefill graphs keep the activations of their largest bucket in their memory pool, beside what an
        # eager pass of the full token budget needs: counted at the measured activations' rate per token
        if self.use_graphs:
            peak += (peak - before) * min(defaults.PREFILL_GRAPH_MAX_TOKENS, n) // n
        self.kv_caches, self.draft_kv_caches, self.buffers = [], [], None
        self.batch.remove("profile")
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used_elsewhere = total - free - torch.cuda.memory_allocated()  # other processes, CUDA context
        return int(memory.kv_budget_bytes(total, memory_utilization, used_elsewhere, peak))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` usable blocks plus one scratch block (id num_blocks) that padding rows write to."""
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, self.block_size, self.kv_heads)
        dtype = self.cache_dtype
        caches = [
            (torch.zeros(*shape, self.k_dim, dtype=dtype, device=self.device),
             torch.zeros(*shape, self.v_dim, dtype=dtype, device=self.device) if self.has_v_cache else None)
            + (self._fp8_scales() if dtype == kv_cache.FP8 else ())
            for _ in range(self.cfg.num_layers + self.num_draft_layers)
        ]
        self.kv_caches, self.draft_kv_caches = caches[: self.cfg.num_layers], caches[self.cfg.num_layers :]

    def _fp8_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (k_scale, v_scale) per KV head (deepfleet.quant.kv_cache says why they are 1.0)."""
        return kv_cache.default_scales(self.kv_heads, self.device), kv_cache.default_scales(self.kv_heads, self.device)

    def _init_buffers(self, max_rows: int, max_tokens: int) -> None:
        self.buffers = InputBuffers(max_tokens, max_rows, self.max_blocks_per_seq, self.scratch_block,
                                    self.block_size, self.device,
                                    lora_null_slot=self.lora.null_slot if self.lora else None)

    def _prefill_base(self, padded: int) -> int:
        """First token/row of the prefill chunks: fixed (after the largest decode batch) where graphs read it."""
        return self.graph_max_batch if self.use_graphs else padded

    # ---- batch set-up ---------------------------------------------------------------------------------------------
    def init_graphs(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        """After the KV cache: allocate the input buffers for batches of up to `max_num_seqs` sequences and, on
        CUDA, capture the decode graphs of the whole batch-size ladder (before the server reports ready)."""
        self.graph_max_batch = max_num_seqs if self.use_graphs else 0
        self.graph_batch_sizes = graph_batch_sizes(max_num_seqs) if self.use_graphs else []
        self.prefill_buckets = prefill_token_buckets(min(defaults.PREFILL_GRAPH_MAX_TOKENS, max_num_batched_tokens,
                                                         self.max_model_len)) if self.use_graphs else []
        # rows: padded decodes plus prefill chunks (a prefill graph's up to its sequence count); tokens: padded
        # decodes plus the token budget or the largest prefill bucket
        self._init_buffers(max_rows=2 * max_num_seqs + self.prefill_graph_seqs,
                           max_tokens=max_num_seqs + max(max_num_batched_tokens, *self.prefill_buckets, 0))
        if self.use_graphs:
            if self.device.type == "cuda":  # (the CPU tests emulate graphs)
                self._choose_gemv()
            self._capture_all()

    def _choose_gemv(self) -> None:
        """Batch-1 projections: the Triton GEMV or cuBLAS per weight shape, whichever is faster here (timed)."""
        t0 = time.perf_counter()
        timings = choose_gemv(self.model, self.device, self.dtype)
        log.info("batch-1 projections (N x K, silu: default ms (cuBLAS; silu: gate_up as chosen + SiLU·mul) / Triton "
                 "GEMV ms at its fastest tiles over all layers, "
                 "in %.1f s): %s", time.perf_counter() - t0, ", ".join(
                     f"{n}x{k}{' silu' if silu else ''}: {a:.3f}/{b:.3f} {tiles}"
                     for (n, k, silu), (a, b, tiles) in timings.items()))

    def forget(self, request_id: str) -> None:
        """A request ended: free its block-table row."""
        self.batch.remove(request_id)

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def _block_tables(self, seqs: list[Sequence], changes: list[Sequence]) -> tuple[np.ndarray, np.ndarray, int]:
        """(a matrix of block-table rows, the sequences' rows in it, the longest table's length): the persistent
        rows updated by `changes`; a tensor-parallel worker's SeqViews (no request id: their tables arrive with
        each step) are copied into a matrix of this step only."""
        if getattr(seqs[0], "request_id", None) is not None:
            batch = self.batch
            batch.apply(changes)
            rows = batch.rows(seqs)
            return batch.tables, rows, int(batch.num_blocks[rows].max())
        tables = [np.asarray(s.block_table, dtype=np.int32) for s in seqs]
        out = np.zeros((len(seqs), max(map(len, tables))), np.int32)
        _copy_rows(out, tables)
        return out, np.arange(len(seqs)), out.shape[1]

    def _stage(self, decodes, prefills, changes, padded: int, pbase: int, bucket: int | None):
        """Fill a staging set and set `sampled`; returns the set with (tokens, rows, width, fills, sampled decode
        rows, sampled prefill rows relative to pbase, prefill metadata). `bucket`: the prefill graph's token count
        (its padding tokens write to the scratch slot; its empty chunks end where the last real one does), or None
        (eager)."""
        buf = self.buffers
        st = buf.staging()
        a = st.np
        bs = self.block_size
        seqs = [seq for seq, _ in decodes]
        tables, table_rows, width = self._block_tables(seqs + [seq for seq, _ in prefills] if prefills else seqs,
                                                       changes)
        # rows: the decodes, then from pbase the chunks (a graph's all its chunks: empty ones' metadata is uploaded
        # too, as the graph reads its whole query_start_loc)
        rows = pbase + (self.prefill_graph_seqs if bucket is not None else len(prefills)) if prefills else padded
        tab = a["tables"][: rows * width].reshape(rows, width)
        # decode rows: per sequence its position, input token and placeholder row (list comprehensions: faster
        # than one generator of tuples), the rest vectorized
        nd = len(decodes)
        positions = [seq.num_computed_tokens for seq in seqs]
        dpos = np.fromiter(positions, np.int64, nd)
        tokens = [seq.token_ids[seq.num_computed_tokens] for seq in seqs]
        ids = np.fromiter(tokens, np.int64, nd)
        fill_dst = np.flatnonzero(ids < 0)  # sampled by the step still in flight: read on the device
        decode_rows = list(range(nd))
        if len(fill_dst) == nd:  # (the steady state under async scheduling: every input token is in flight)
            fill_src = np.fromiter([seq.pending_row for seq in seqs], np.int64, nd)
        else:
            fill_src = np.array([seqs[i].pending_row for i in fill_dst.tolist()], np.int64)
            # a placeholder is its sequence's last token, so its row is sampled; a host token's row is sampled when
            # it is its sequence's last (not when the budget cut a prompt chunk to one token)
            decode_rows = [i for i in decode_rows if tokens[i] < 0 or positions[i] + 1 == len(seqs[i].token_ids)]
        sampled = seqs if len(decode_rows) == nd else [seqs[i] for i in decode_rows]
        tab[:nd] = tables[table_rows[:nd], :width]
        rows_nd = np.arange(nd)
        a["ids"][:nd] = ids
        a["ids"][fill_dst] = 0
        a["positions"][:nd] = dpos
        a["slots"][:nd] = tab[rows_nd, dpos // bs].astype(np.int64) * bs + dpos % bs
        a["ctx_lens"][:nd] = dpos + 1
        a["ids"][nd:padded] = 0
        a["positions"][nd:padded] = 0
        a["slots"][nd:padded] = buf.scratch_slot
        a["ctx_lens"][nd:padded] = 1
        tab[nd:padded, :1] = buf.scratch_block
        a["query_start"][: padded + 1] = np.arange(padded + 1)
        prefill_meta, prefill_rows, q_start = [], [], pbase + 1
        a["query_start"][q_start] = 0
        t = pbase
        for j, (seq, n) in enumerate(prefills):
            start = seq.num_computed_tokens
            table = tables[table_rows[nd + j]]
            pos = np.arange(start, start + n)
            a["ids"][t : t + n] = seq.token_ids[start : start + n]
            a["positions"][t : t + n] = pos
            a["slots"][t : t + n] = table[pos // bs] * bs + pos % bs
            a["ctx_lens"][pbase + j] = start + n
            a["query_start"][q_start + j + 1] = t + n - pbase
            tab[pbase + j] = table[:width]
            prefill_meta.append((n, start + n))
            if start + n == seq.num_tokens:  # sampled: its last row, or every row that scores a draft and the last
                drafts = seq.num_draft_tokens
                prefill_rows.extend(range(t + n - 1 - drafts - pbase, t + n - pbase))
                sampled = [*sampled, seq]
            t += n
        if bucket is not None:  # the graph's padding: tokens of no sequence, empty chunks
            a["query_start"][q_start + len(prefills) + 1 : q_start + self.prefill_graph_seqs + 1] = t - pbase
            end = pbase + bucket
            a["ids"][t:end] = 0
            a["positions"][t:end] = 0
            a["slots"][t:end] = buf.scratch_slot
            t = end
        a["fill"][: len(fill_dst)] = fill_dst
        a["fill"][len(fill_dst) : 2 * len(fill_dst)] = fill_src
        if self.lora is not None:
            self._stage_lora_slots(a["lora_slots"], decodes, prefills, padded, pbase, t)
        self.sampled = sampled
        return st, t if prefills else padded, rows, width, len(fill_dst), decode_rows, prefill_rows, prefill_meta

    def _stage_lora_slots(self, out: np.ndarray, decodes, prefills, padded: int, pbase: int, end: int) -> None:
        """Each token's adapter slot; `end`: past the last prefill token staged (a graph's padding included)."""
        null = self.lora.null_slot
        out[: len(decodes)] = [null if s.lora_slot is None else s.lora_slot for s, _ in decodes]
        out[len(decodes) : padded] = null
        t = pbase
        for seq, n in prefills:
            out[t : t + n] = null if seq.lora_slot is None else seq.lora_slot
            t += n
        out[t:end] = null

    def _meta(self, rows: slice, tokens: slice, q_start: slice, width: int, num_decodes: int,
              prefills: list[tuple[int, int]], max_query_len: int | None = None) -> AttentionMetadata:
        buf = self.buffers
        if max_query_len is None:
            max_query_len = max((n for n, _ in prefills), default=1)
        return AttentionMetadata(
            num_decodes=num_decodes, slot_mapping=buf.slots[tokens], context_lens=buf.ctx_lens[rows],
            block_tables=buf.block_tables[rows, :width], block_size=self.block_size, prefills=prefills,
            query_start_loc=buf.query_start[q_start], max_query_len=max_query_len)

    def _prefill_meta(self, pbase: int, bucket: int) -> AttentionMetadata:
        """A prefill graph's metadata: its sequence count of chunks over `bucket` tokens, full-width tables."""
        seqs = self.prefill_graph_seqs
        return self._meta(slice(pbase, pbase + seqs), slice(pbase, pbase + bucket),
                          slice(pbase + 1, pbase + seqs + 2), self.max_blocks_per_seq, 0, [], max_query_len=bucket)

    def _prefill_bucket(self, prefills: list[tuple[Sequence, int]]) -> int | None:
        """The prefill graph for these chunks, or None (eager: too many chunks or tokens, or only long chunks,
        which attend faster through SDPA)."""
        if not self.prefill_buckets or len(prefills) > self.prefill_graph_seqs:
            return None
        if all(n >= defaults.LONG_PREFILL_TOKENS for _, n in prefills):
            return None
        tokens = sum(n for _, n in prefills)
        return next((b for b in self.prefill_buckets if b >= tokens), None)

    # ---- execution ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, prev_token_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run one step. Returns logits [num sampled sequences, vocab] (float32), rows in the order of `sampled`,
        or None if none is sampled.
        `prev_token_ids`: the previous step's sampled tokens on the device, for decode rows whose input token is
        still a placeholder (Sequence.pending_row names its row there)."""
        self.prompt_logprobs = []
        nd = out.num_decodes
        decodes, prefills = out.scheduled[:nd], out.scheduled[nd:]
        graph = self.use_graphs and 0 < nd <= self.graph_max_batch
        padded = next(b for b in self.graph_batch_sizes if b >= nd) if graph else nd
        pbase = self._prefill_base(padded)
        bucket = self._prefill_bucket(prefills) if prefills else None
        st, num_tokens, rows, width, fills, decode_rows, prefill_rows, prefill_meta = self._stage(
            decodes, prefills, out.table_changes, padded, pbase, bucket)
        buf = self.buffers
        buf.upload(st, num_tokens, rows, width, fills, prev_token_ids)
        parts = []
        if nd:
            if graph:
                g, logits = self.graphs[padded]
                g.replay()
            else:
                meta = self._meta(slice(0, nd), slice(0, nd), slice(0, nd + 1), width, nd, [])
                self._set_lora_tokens(slice(0, nd))
                decode_hidden = self.model(buf.ids[:nd], buf.positions[:nd], self.kv_caches, meta)
                logits = self.model.compute_logits(decode_hidden)
                if self.num_draft_layers:
                    self.step_hidden = decode_hidden
            if decode_rows:
                parts.append(logits[:nd] if len(decode_rows) == nd else logits[to_device(torch.tensor(decode_rows),
                                                                                        self.device)])
        if prefills:
            real = sum(n for n, _ in prefill_meta)
            if bucket is not None:
                g, hidden = self.prefill_graphs[bucket]
                g.replay()
            else:
                tokens = slice(pbase, pbase + real)
                meta = self._meta(slice(pbase, rows), tokens, slice(pbase + 1, pbase + 2 + len(prefills)), width, 0,
                                  prefill_meta)
                self._set_lora_tokens(tokens)
                hidden = self.model(buf.ids[tokens], buf.positions[tokens], self.kv_caches, meta)
            if self.num_draft_layers:
                self.step_hidden = hidden[:real] if not nd else torch.cat([self.step_hidden, hidden[:real]])
            # (a tensor-parallel worker's SeqView has no prompt_logprobs: the driver refuses them at TP > 1)
            if any(getattr(s, "prompt_logprobs", None) is not None for s, _ in prefills):
                self.prompt_logprobs = self._prompt_logprobs(prefills, hidden)
            if prefill_rows:
                rows_at = hidden[real - 1 : real] if prefill_rows == [real - 1] else hidden[
                    to_device(torch.tensor(prefill_rows), self.device)]
                parts.append(self.model.compute_logits(rows_at))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prompt_logprobs(self, prefills, hidden: torch.Tensor) -> list:
        """Score each prompt token after the first from the hidden state before it (vLLM's prompt_logprobs)."""
        found, t = [], 0
        for seq, n in prefills:
            start, prompt_len = seq.num_computed_tokens, len(seq.prompt_token_ids)
            end = min(start + n, prompt_len - 1)  # hidden at position p scores prompt token p + 1
            if seq.prompt_logprobs is not None and end > start:
                lp = torch.log_softmax(self.model.compute_logits(hidden[t : t + end - start]).float(), dim=-1)
                targets = to_device(torch.tensor(seq.prompt_token_ids[start + 1 : end + 1]), self.device)
                chosen = lp.gather(1, targets[:, None])
                ranks = (lp > chosen).sum(dim=1) + 1
                k = seq.params.prompt_logprobs
                top = lp.topk(k, dim=-1) if k else None
                found.append((seq, start + 1, (targets, chosen[:, 0], ranks,
                                               *((top.indices, top.values) if top is not None else ()))))
            t += n
        return found

    def _set_lora_tokens(self, tokens: slice) -> None:
        if self.lora is not None:
            set_token_slots(self.buffers.lora_slots[tokens])

    def propose_mtp(self, inputs) -> list[list[int]]:
        """Run the MTP layers over the last step's accepted tokens; the drafts of the sequences that asked for
        them (spec_decode/mtp.py). A method here so tensor-parallel workers run it too."""
        from deepfleet.engine.spec_decode.mtp import propose

        return propose(self, inputs)

    # ---- CUDA graphs ----------------------------------------------------------------------------------------------
    def _capture_all(self) -> None:
        """Prefill buckets, then decode batches, largest first: the smaller graphs then fit in the memory pool the
        larger ones left."""
        buf = self.buffers
        pool = torch.cuda.graph_pool_handle()
        # every graph writes its output into rows of one buffer: a graph's own output tensor would stay allocated
        # for as long as the graph lives, and the whole ladder's would add up to tens of GB
        shared = torch.empty(self.graph_max_batch, self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        hidden = torch.empty(max(self.prefill_buckets, default=0), self.cfg.hidden_size, dtype=self.dtype,
                             device=self.device)
        torch.cuda.synchronize()
        t0, mem0 = time.perf_counter(), torch.cuda.mem_get_info()[0]
        pbase, seqs = self._prefill_base(0), self.prefill_graph_seqs
        for t in reversed(self.prefill_buckets):
            # one chunk of t tokens over the scratch block (the buffers' initial tables), the other chunks empty
            buf.query_start[pbase + 1 : pbase + seqs + 2].fill_(t)
            buf.query_start[pbase + 1] = 0
            buf.ctx_lens[pbase : pbase + seqs].fill_(t)
            tokens = slice(pbase, pbase + t)
            self._set_lora_tokens(tokens)  # the graph reads the slot buffer in place at every replay

            def forward(out=hidden[:t], tokens=tokens, t=t):
                out.copy_(self.model(buf.ids[tokens], buf.positions[tokens], self.kv_caches,
                                     self._prefill_meta(pbase, t)))

            self.prefill_graphs[t] = (self._capture(forward, pool, f"prefill bucket {t} tokens"), hidden[:t])
        for b in reversed(self.graph_batch_sizes):
            buf.query_start[: b + 1].copy_(torch.arange(b + 1, dtype=torch.int32))
            meta_args = (slice(0, b), slice(0, b), slice(0, b + 1), self.max_blocks_per_seq, b, [])
            self._set_lora_tokens(slice(0, b))  # the graph reads the slot buffer in place at every replay

            def forward(out=shared[:b], b=b, meta_args=meta_args):
                self.model.compute_logits(
                    self.model(buf.ids[:b], buf.positions[:b], self.kv_caches, self._meta(*meta_args)), out)

            self.graphs[b] = (self._capture(forward, pool, f"decode batch {b}"), shared[:b])
        torch.cuda.synchronize()
        used = mem0 - torch.cuda.mem_get_info()[0]
        log.info("captured %d CUDA graphs (decode batch 1..%d, prefill 16..%d tokens) in %.1f s, %.2f GiB",
                 len(self.graphs) + len(self.prefill_graphs), self.graph_max_batch,
                 max(self.prefill_buckets, default=0), time.perf_counter() - t0, used / 2**30)

    def _capture(self, forward, pool, what: str) -> torch.cuda.CUDAGraph:
        try:
            forward()  # warm-up outside capture (compiles the fused kernels, settles kernel choices for this shape)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                forward()
        except torch.OutOfMemoryError as exc:
            raise StartupError(
                f"out of GPU memory while capturing the CUDA graph for {what} (max_num_seqs "
                f"{self.graph_max_batch}): lower max_num_seqs or gpu_memory_utilization, or set "
                f"enforce_eager") from exc
        return graph
