"""The tensor-parallel group this process belongs to: its rank, its size and the three collectives the layers use.

One group per engine: every rank holds the same layers with its slice of each weight. Without `init()` (one device)
the group has size 1 and every collective is the identity, so the single-device engine runs the same layers with
no communication: the degenerate case, not a second code path.

Hidden states are replicated on every rank between blocks (after each all-reduce), which is what lets the vocab
embedding, the router and expert parallelism need no extra exchange (see `distributed/layers.py`)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepfleet.distributed import nccl_env


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False

    def split(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total` items (callers check divisibility first)."""
        n = total // self.size
        return self.rank * n, n


_GROUP = TPGroup()


def group() -> TPGroup:
    return _GROUP


def init(rank: int, size: int, init_method: str, device: torch.device, timeout_s: float,
         expert_parallel: bool = False) -> None:
    """Join the process group (NCCL for CUDA devices, gloo for CPU). `timeout_s` bounds every collective, so a
    rank that hangs turns into an error on the others rather than a silent stall."""
    global _GROUP
    os.environ.update(nccl_env.child_env(os.environ))  # the driver's own NCCL sees what its workers see
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    except Exception as e:
        raise RuntimeError(f"engine.tensor_parallel_size={size}: rank {rank} could not join the {backend} process "
                           f"group at {init_method} ({e})") from e
    _GROUP = TPGroup(rank, size, expert_parallel)


def set_group(g: TPGroup) -> None:
    """Layers read the group when they are built: the runner sets it before building the model."""
    global _GROUP
    _GROUP = g


def destroy() -> None:
    global _GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = TPGroup()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of the ranks' partial results (row-parallel outputs), in place."""
    if _GROUP.size > 1:
        dist.all_reduce(x)
    return x


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` on every rank, in place (the previous step's sampled tokens under async scheduling)."""
    if _GROUP.size > 1:
        dist.broadcast(x, src=0)
    return x


# one output tensor, no list: NCCL captures it inside the CUDA graphs (the decode graphs end with the logits)
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """The ranks' [T, n] tensors as [T, size * n], in rank order (vocab-parallel logits)."""
    if _GROUP.size == 1:
        return x
    out = x.new_empty(_GROUP.size * x.shape[0], x.shape[1])
    _gather_into(out, x.contiguous())
    return out.view(_GROUP.size, x.shape[0], x.shape[1]).permute(1, 0, 2).reshape(x.shape[0], -1)
