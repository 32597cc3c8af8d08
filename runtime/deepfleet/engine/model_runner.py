"""Runs the model for one scheduled batch: flattens the sequences into one token row (decodes first), builds
positions, cache slots, block tables and context lengths, runs the forward pass and returns the logits of the
sequences whose last token was computed. On CUDA, pure-decode steps replay CUDA graphs captured per (batch size,
block-table width) bucket, which removes the per-kernel launch cost that dominates small-batch decode."""

from __future__ import annotations

import itertools
import logging
import math

import torch

from deepfleet.engine import memory
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.scheduler import SchedulerOutput
from deepfleet.engine.sequence import Sequence
from deepfleet.models.attention import AttentionMetadata
from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import use_fused_kernels
from deepfleet.models.loader import load_model

log = logging.getLogger(__name__)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _graph_inputs(ids, positions, meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
    """The device inputs a captured decode graph reads, in the order static_meta() maps them."""
    return ids, positions, meta.slot_mapping, meta.context_lens, meta.block_tables, meta.query_start_loc


class ModelRunner:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 block_size: int, enforce_eager: bool, load_format: str = "auto", quantization: str | None = None):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.block_size, self.max_model_len = block_size, max_model_len
        self.model = load_model(cfg, dtype, device, max_positions=max(max_model_len, cfg.max_position_embeddings),
                                load_format=load_format, quantization=quantization)
        self.kv_heads, self.k_dim, self.v_dim = self.model.kv_cache_layout()
        self.has_v_cache = self.v_dim is not None  # None: values are part of the cached keys (MLA)
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self.use_graphs = device.type == "cuda" and not enforce_eager and getattr(self.model, "cuda_graph_safe", True)
        use_fused_kernels(device.type == "cuda" and not enforce_eager)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_max_batch = 0  # set by init_graphs once max_num_seqs is known

    # ---- KV cache -------------------------------------------------------------------------------------------------
    def block_bytes(self) -> int:
        return memory.kv_block_bytes((self.kv_heads, self.k_dim, self.v_dim), self.cfg.num_layers, self.block_size,
                                     torch.finfo(self.dtype).bits // 8)

    def profile_num_blocks(self, max_num_batched_tokens: int, memory_utilization: float) -> int:
        """GPU: run the largest prefill once to measure activation memory; the rest of the budget holds KV blocks."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(max_num_batched_tokens, self.max_model_len)
        self.allocate_kv_cache(math.ceil(n / self.block_size))
        seq = Sequence("profile", None, [0] * n, SamplingParams())
        seq.block_table = list(range(math.ceil(n / self.block_size)))
        self.execute(SchedulerOutput(scheduled=[(seq, n)]))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        used_elsewhere = total - free - torch.cuda.memory_allocated()  # other processes, CUDA context
        budget = memory.kv_budget_bytes(total, memory_utilization, used_elsewhere, peak)
        blocks = memory.num_kv_blocks(budget, self.block_bytes())
        if blocks < self.max_blocks_per_seq:
            raise RuntimeError(f"not enough GPU memory for one {self.max_model_len}-token sequence "
                               f"({blocks} KV blocks fit); lower max_model_len or raise gpu_memory_utilization")
        return blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` usable blocks plus one scratch block (id num_blocks) that padding rows write to."""
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, self.block_size, self.kv_heads)
        self.kv_caches = [
            (torch.zeros(*shape, self.k_dim, dtype=self.dtype, device=self.device),
             torch.zeros(*shape, self.v_dim, dtype=self.dtype, device=self.device) if self.has_v_cache else None)
            for _ in range(self.cfg.num_layers)
        ]

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def _prepare(self, out: SchedulerOutput, width: int | None = None, pad_to: int | None = None):
        ids, positions, slots, ctx_lens, tables, prefills, sample_rows = [], [], [], [], [], [], []
        bs = self.block_size
        num_decodes = sum(1 for _, n in out.scheduled if n == 1)
        width = width or max(len(s.block_table) for s, _ in out.scheduled)
        for seq, n in out.scheduled:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            ctx_lens.append(start + n)
            tables.append(seq.block_table + [self.scratch_block] * (width - len(seq.block_table)))
            if n != 1:
                prefills.append((n, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
        query_lens = [n for _, n in out.scheduled]
        for _ in range((pad_to or 0) - len(ids)):  # CUDA-graph padding rows: harmless writes to the scratch block
            query_lens.append(1)
            ids.append(0)
            positions.append(0)
            slots.append(self.scratch_block * bs)
            ctx_lens.append(1)
            tables.append([self.scratch_block] * width)
        dev = self.device

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        query_start_loc = list(itertools.accumulate(query_lens, initial=0))
        meta = AttentionMetadata(num_decodes=num_decodes,
                                 slot_mapping=t(slots, torch.long), context_lens=t(ctx_lens, torch.int32),
                                 block_tables=t(tables, torch.int32), block_size=bs, prefills=prefills,
                                 query_start_loc=t(query_start_loc, torch.int32), max_query_len=max(query_lens))
        return t(ids, torch.long), t(positions, torch.long), meta, sample_rows

    # ---- execution ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Run one step. Returns logits [num sampled sequences, vocab] (float32), or None if none is sampled.

        A step that mixes decodes with prefill chunks runs as two passes when the decodes can replay a CUDA graph:
        under online load nearly every step admits some new prompt, and one eager pass over hundreds of decode rows
        costs far more launches than a graph replay plus a small eager prefill pass. CPU takes the same split (no
        graphs there) so the tests cover it."""
        num_decodes = sum(1 for _, n in out.scheduled if n == 1)  # decodes come first
        graphable = self.use_graphs and 0 < num_decodes <= self.graph_max_batch
        if num_decodes in (0, len(out.scheduled)) or not (graphable or self.device.type == "cpu"):
            hidden, rows = self._forward(out)
            sampled = [hidden[rows] if len(rows) != hidden.shape[0] else hidden] if rows else []
        else:
            sampled = []
            for part in (out.scheduled[:num_decodes], out.scheduled[num_decodes:]):
                hidden, rows = self._forward(SchedulerOutput(scheduled=part))
                sampled += [hidden[rows]] if rows else []
        if not sampled:
            return None
        return self.model.compute_logits(sampled[0] if len(sampled) == 1 else torch.cat(sampled))

    def _forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of one pass and the rows to sample: pure-decode batches replay a CUDA graph."""
        if self.use_graphs and len(out.scheduled) <= self.graph_max_batch and all(n == 1 for _, n in out.scheduled):
            return self._run_graph(out)
        ids, positions, meta, rows = self._prepare(out)
        return self.model(ids, positions, self.kv_caches, meta), rows

    # ---- CUDA graphs ----------------------------------------------------------------------------------------------
    def init_graphs(self, max_batch: int) -> None:
        self.graph_max_batch = max_batch if self.use_graphs else 0
        self.graph_batch_sizes = sorted({min(_pow2_at_least(b), max_batch) for b in range(1, max_batch + 1)})
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _run_graph(self, out: SchedulerOutput):
        n = len(out.scheduled)
        batch = next(b for b in self.graph_batch_sizes if b >= n)
        need = max(len(s.block_table) for s, _ in out.scheduled)
        width = min(_pow2_at_least(need), _pow2_at_least(self.max_blocks_per_seq))
        ids, positions, meta, rows = self._prepare(out, width=width, pad_to=batch)
        key = (batch, width)
        if key not in self.graphs:
            self._capture(key, ids, positions, meta)
        graph, static = self.graphs[key]
        inputs, hidden = static
        for dst, src in zip(inputs, _graph_inputs(ids, positions, meta), strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return hidden[:n], rows

    def _capture(self, key, ids, positions, meta: AttentionMetadata) -> None:
        static_in = [x.clone() for x in _graph_inputs(ids, positions, meta)]

        def static_meta() -> AttentionMetadata:  # fresh per use: metadata caches tensors built during a forward
            return AttentionMetadata(num_decodes=key[0], slot_mapping=static_in[2], context_lens=static_in[3],
                                     block_tables=static_in[4], block_size=self.block_size, prefills=[],
                                     query_start_loc=static_in[5], max_query_len=1)

        self.model(static_in[0], static_in[1], self.kv_caches, static_meta())  # warm-up (and compile) outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            hidden = self.model(static_in[0], static_in[1], self.kv_caches, static_meta())
        self.graphs[key] = (graph, (static_in, hidden))
        log.info("captured CUDA graph for decode batch %d, block-table width %d", *key)
