"""Tensor-parallel layers (Megatron-LM's split): a column-parallel linear splits its output features across the
ranks, a row-parallel one splits its input features and sums the partial products with one all-reduce. Paired as
column → row (q/k/v → o_proj, gate/up → down), each attention and MLP block costs exactly one all-reduce.

Every parameter made here knows its slice of the checkpoint: `tp_index(shard, full_shape)` gives the index of this
rank's part of a checkpoint tensor (None: the tensor belongs to another rank), which the loader applies to the
memory-mapped file (safetensors `get_slice`) so a rank reads only its bytes; `full_shards` lists the checkpoint
tensors' full shapes so dummy weights can be drawn in full and sliced, identically on every tensor-parallel size.

Units: a split never cuts inside a head. A column shard is `units` units of `unit_size` rows; when there are fewer
units than ranks (e.g. 8 KV heads on 16 ranks) each rank holds one whole unit, replicated across
size // units ranks, as vLLM does for KV heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepfleet.distributed import parallel_state as ps
from deepfleet.models.layers import Linear, matmul
from deepfleet.quant.linear import Fp8Linear, fp8_linear
from deepfleet.quant.spec import QuantSpec

Index = tuple[slice, ...]


def unit_range(units: int, g: ps.TPGroup) -> tuple[int, int]:
    """(first unit, number of units) this rank holds of a column shard of `units` units."""
    if units >= g.size:
        return g.split(units)
    return g.rank * units // g.size, 1


def _rows(start: int, n: int, ndim: int, dim: int = 0) -> Index:
    idx = [slice(None)] * ndim
    idx[dim] = slice(start, start + n)
    return tuple(idx)


class _ColumnSplit:
    """Which rows of each fused checkpoint tensor this rank holds. `shards`: per fused checkpoint tensor,
    (units, unit_size); a plain layer is one shard of `out_features` units of one row."""

    def __init__(self, shards: list[tuple[int, int]]):
        g = ps.group()
        self.full_sizes = [u * s for u, s in shards]
        self.ranges = [(unit_range(u, g), s) for u, s in shards]
        self.local_sizes = [n * s for (_, n), s in self.ranges]

    def index(self, shard: int | None, full_shape: tuple[int, ...]) -> Index:
        (first, n), unit = self.ranges[shard or 0]
        return _rows(first * unit, n * unit, len(full_shape))

    def mark(self, layer: nn.Module) -> None:
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.tp_index = self.index
                p.full_shards = [(k, (size, *p.shape[1:])) for k, size in zip(p.expected_shards, self.full_sizes,
                                                                                 strict=True)]


class _RowSplit:
    """Which input features (columns) this rank holds: an even share. The bias is not split."""

    def __init__(self, in_features: int, out_features: int):
        self.full_in, self.out_features = in_features, out_features
        self.start, self.local_in = ps.group().split(in_features)

    def index(self, shard, full_shape: tuple[int, ...]) -> Index:
        return _rows(self.start, self.local_in, len(full_shape), dim=1)

    def mark(self, layer: nn.Module) -> None:
        layer.weight.tp_index = self.index
        layer.weight.full_shards = [(None, (self.out_features, self.full_in))]


class ColumnParallelLinear(Linear):
    """Output features split across ranks in whole units (see _ColumnSplit)."""

    def __init__(self, in_features: int, shards: list[tuple[int, int]], bias: bool = False):
        split = _ColumnSplit(shards)
        super().__init__(in_features, split.local_sizes, bias)
        split.mark(self)


class RowParallelLinear(Linear):
    """Input features split evenly across ranks; the partial products are summed over the ranks (`reduce`), then
    the bias, held whole on every rank, is added once. `reduce=False` leaves the sum to the caller, which lets a
    block that adds several partial results (MoE: routed + shared experts) pay for one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce: bool = True):
        split = _RowSplit(in_features, out_features)
        super().__init__(split.local_in, out_features, bias=bias)
        self.reduce = reduce
        split.mark(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x, self.weight, gemv_tiles=self.gemv_tiles)
        if self.reduce:
            y = ps.all_reduce(y)
        return y if self.bias is None else y + self.bias


# ---- block-FP8 (quant/linear.py's Fp8Linear) split the same way ------------------------------------------------


def block_index(index: Index | None, block: tuple[int, int]) -> Index | None:
    """A rank's index into a 2-D weight [rows, cols] -> its index into the weight's block scales [R, C]. Exact when
    each split bound is a multiple of its block or the dimension's end (fp8_shards.check_block_alignment)."""
    if index is None:
        return None
    return tuple(s if s == slice(None) else slice(s.start // b, -(-s.stop // b)) for s, b in zip(index, block,
                                                                                              strict=True))


def mark_scales(weight: nn.Parameter, scale: nn.Parameter, block: tuple[int, int]) -> None:
    """The scales of a split FP8 weight: the blocks of its rows and columns, read from the same file region."""
    scale.tp_index = lambda shard, full_shape: block_index(weight.tp_index(shard, full_shape), block)


class Fp8ColumnParallelLinear(Fp8Linear):
    def __init__(self, in_features: int, shards: list[tuple[int, int]], bias: bool, spec: QuantSpec):
        split = _ColumnSplit(shards)
        super().__init__(in_features, split.local_sizes, bias, spec)
        split.mark(self)
        mark_scales(self.weight, self.weight_scale_inv, self.block)


class Fp8RowParallelLinear(Fp8Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, reduce: bool = True):
        split = _RowSplit(in_features, out_features)
        super().__init__(split.local_in, out_features, bias, spec)
        self.reduce = reduce
        split.mark(self)
        mark_scales(self.weight, self.weight_scale_inv, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.weight_scale_inv, self.block, gemv_tiles=self.gemv_tiles)
        if self.reduce:
            y = ps.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split across ranks (padded to a multiple of the size); a rank looks up the ids it holds,
    zeros the others, and the all-reduce assembles the embeddings. The same weight serves as the (tied) LM head."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        g = ps.group()
        self.num_embeddings = num_embeddings
        self.per_rank = math.ceil(num_embeddings / g.size)
        self.start = g.rank * self.per_rank
        self.held = max(0, min(self.per_rank, num_embeddings - self.start))  # real rows (the last rank may pad)
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim), requires_grad=False)
        self.weight.tp_index = self._tp_index
        self.weight.weight_loader = self._load
        self.weight.full_shards = [(None, (num_embeddings, dim))]
        self.sharded = g.size > 1

    def _tp_index(self, shard, full_shape: tuple[int, ...]) -> Index:
        return _rows(self.start, self.held, len(full_shape))

    def _load(self, param: nn.Parameter, tensor: torch.Tensor, shard=None) -> None:
        if tuple(tensor.shape) != (self.held, param.shape[1]):
            raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {(self.held, param.shape[1])}")
        param.data[: self.held].copy_(tensor)
        param.data[self.held :].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.held)
        out = F.embedding(local.masked_fill(~mine, 0), self.weight).masked_fill(~mine[:, None], 0)
        return ps.all_reduce(out)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H] -> logits [T, vocab] (float32) on every rank: local rows, gathered in rank order; written
        into `out` [T, vocab] float32 when given (a CUDA graph's output buffer)."""
        if not self.sharded and hidden.is_cuda and hidden.dim() == 2:
            # the GEMM's float32 accumulator stored as it is, once: no [T, vocab] product in the weights' dtype
            # converted and copied again (at 256 rows of a 152k vocabulary those two passes took ~200 us a step on
            # the H200); the sampler's logits lose the rounding to bf16 and nothing else
            wide = {} if hidden.dtype == torch.float32 else {"out_dtype": torch.float32}
            product = (hidden, self.weight.t())
            return torch.mm(*product, **wide) if out is None else torch.mm(*product, **wide, out=out)
        local = F.linear(hidden, self.weight).float()
        full = ps.all_gather_last(local)[:, : self.num_embeddings]
        return full if out is None else out.copy_(full)


def shard_experts(num_experts: int) -> tuple[int, int]:
    """(first expert, experts held) under expert parallelism; (0, all) otherwise.

    Dispatch and combine. Attention here is tensor-parallel, so after its all-reduce every rank already holds every
    token's hidden state: dispatch needs no communication at all (the all-gather of the all-gather + reduce-scatter
    scheme is free), each rank runs the tokens routed to its experts, and the combine is the sum over ranks of their
    partial outputs, one all-reduce per MoE block, the same single collective a tensor-parallel MLP pays (shared
    experts' partial sums ride along). All-to-all moves only the routed tokens (top-k / E of the data per rank)
    and wins when each rank owns different tokens, i.e. with data-parallel attention, or across nodes where
    bandwidth is scarce (DeepEP); with replicated tokens it would send what every rank already has.

    Attention tensor-parallel vs data-parallel. Data-parallel attention (SGLang's DP attention, up to 1.9x decode
    throughput reported on V3) keeps each rank's sequences and their MLA latent cache on that rank alone: MLA has a
    single latent "KV head", so tensor parallelism must replicate the latent cache on every rank, which wastes
    size-1 of every size copies of KV memory and caps the batch. We start with TP attention because it keeps one
    scheduler, one batch and one step input for all ranks (this module's whole design), gives the lowest batch-1
    latency (every rank works on every token) and needs no all-to-all kernel; DP attention needs per-rank schedulers
    and an all-to-all dispatch (the next step for V3 at large batch, where the KV memory is what limits)."""
    g = ps.group()
    return g.split(num_experts) if g.expert_parallel else (0, num_experts)


def expert_inner_split(inner: int) -> tuple[int, int]:
    """(start, length) of each expert's inner dimension this rank holds: tensor-parallel experts split it, expert
    parallelism keeps experts whole."""
    g = ps.group()
    return (0, inner) if g.expert_parallel else g.split(inner)


def local_heads(heads: int) -> int:
    """Attention (or KV) heads this rank computes: its share, or one replicated head when there are fewer."""
    return unit_range(heads, ps.group())[1]
