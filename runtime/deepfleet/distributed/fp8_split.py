"""Whether block-FP8 weights split over the ranks: every split bound must fall on a scale block.

A block-FP8 weight has one scale per (128 × 128) block. A rank holding rows (or input features) [start, stop) of a
checkpoint tensor reads the scales of blocks [start // 128, ceil(stop / 128)) (layers.block_index) and its layer
assumes that its local row j lies in local block j // 128, which is the global block (start + j) // 128 for every j
exactly when start is a multiple of 128; `stop` must be one too unless it is the dimension's end (the published
partial last block, e.g. kv_a_proj_with_mqa's 576 rows, which is never split). Under that condition a rank's
weights and scales are bit for bit the checkpoint's, and a bf16 checkpoint quantized on load per rank gets the very
blocks quantizing it whole would give (each block is quantized on its own), so every tensor-parallel size serves
the same model. A split bound inside a block is refused: the rank's scales would straddle another rank's rows.

Every split here is even (rank r holds [r·n, (r+1)·n), or one whole replicated unit [u·w, (u+1)·w)), so all
ranks' bounds are block multiples exactly when rank 0's `stop` is (n or w a multiple of the block): checking
rank 0's model, built on the meta device (shapes only, no memory), checks every rank. Checked with the published
configs (plan/presets.py): DeepSeek-V3/R1 splits at 2 to 16 ranks, with or without expert parallelism (at 8:
moe_intermediate_size 2048 / 8 = 256, 16 heads × 192 q rows); the R1 distills quantized on load split at 2 and 4
ranks (70B and 32B at 8 too; e.g. 7B: intermediate 18944 / 4 = 4736 = 37 × 128) except 1.5B at 4, refused
(intermediate 8960 / 4 = 2240 = 17.5 blocks)."""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.distributed import parallel_state as ps
from deepfleet.quant.fp8 import FP8
from deepfleet.quant.spec import resolve

_EXPERT_PROJ = {("w13", 0): "gate_proj", ("w13", 1): "up_proj", ("w2", None): "down_proj"}


def checkpoint_name(model: nn.Module, param: str, shard) -> str:
    """The checkpoint tensor a (parameter, shard) loads from: the inverse of the model's `param_for`."""
    parts = param.split(".")
    if isinstance(shard, tuple):  # a stacked expert: (expert, half)
        expert, half = shard
        return ".".join([*parts[:-1], str(expert), _EXPERT_PROJ[(parts[-1], half)], "weight"])
    if shard is not None:
        fused = parts[-2]
        original = next(k for k, v in model.fused_names.items() if v == (fused, shard))
        return ".".join([*parts[:-2], original, parts[-1]])
    return param


def check_block_alignment(model: nn.Module, block: tuple[int, int], setting: str) -> None:
    """Raise naming the first checkpoint tensor whose split bounds are not multiples of the scale block."""
    for name, p in model.named_parameters():
        if p.dtype != FP8 or not hasattr(p, "tp_index"):
            continue
        for shard, full in p.full_shards:
            where = p.tp_index(shard, full)
            if where is None:
                continue
            for dim, (s, size, b) in enumerate(zip(where, full, block, strict=True)):
                start, stop, _ = s.indices(size)
                if start % b or (stop % b and stop != size):
                    what = "rows" if dim == 0 else "input features"
                    raise ValueError(
                        f"{setting} with FP8 weights: {checkpoint_name(model, name, shard)} {list(full)} would be "
                        f"split with rank {ps.group().rank} holding {what} [{start}, {stop}) of {size}, not whole "
                        f"{b}-wide blocks of its {block[0]}x{block[1]} weight_block_size scales; choose a "
                        f"tensor_parallel_size that splits it into multiples of {b}")


def check_fp8_split(cfg, size: int, expert_parallel: bool, quantization: str | None) -> None:
    """Build rank 0's model on the meta device under the FP8 spec and check its splits (see the module doc)."""
    spec = resolve(cfg.raw, cfg.path / "config.json", quantization)
    if spec is None:
        return
    from deepfleet.models.loader import build_model

    previous = ps.group()
    ps.set_group(ps.TPGroup(0, size, expert_parallel))
    try:
        model = build_model(cfg, torch.bfloat16, torch.device("meta"), 1, spec)
        check_block_alignment(model, spec.block, f"engine.tensor_parallel_size={size}")
    finally:
        ps.set_group(previous)
