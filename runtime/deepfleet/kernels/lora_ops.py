"""The batched LoRA add for the device at hand: the Triton kernels (kernels/lora.py) on CUDA, torch gathers and
batched matmuls elsewhere (CPU, and the kernels' check under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch


def lora_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
             shard_offsets: list[int]) -> torch.Tensor:
    """y [T, out] += per token t: B[slots[t]] · (A[slots[t]] · x[t]), shard by shard (see kernels/lora.py)."""
    if x.is_cuda:
        from deepfleet.kernels.lora import lora_add as triton_lora_add

        return triton_lora_add(y, x, a, b, slots, shard_offsets)
    return lora_add_reference(y, x, a, b, slots, shard_offsets)


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                       shard_offsets: list[int]) -> torch.Tensor:
    """The same with torch gathers and batched matmuls (CPU; the kernels' check). The "no adapter" slot's
    matrices are zero, so its tokens gain nothing without a branch."""
    r = b.shape[2]
    h = torch.bmm(a[slots].float(), x.float().unsqueeze(-1))  # [T, shards·R, 1]
    bg = b[slots].float()  # [T, out, R]
    ends = [*shard_offsets[1:], b.shape[1]]
    for j, (lo, hi) in enumerate(zip(shard_offsets, ends, strict=True)):
        y[:, lo:hi] += torch.bmm(bg[:, lo:hi], h[:, j * r : (j + 1) * r]).squeeze(-1).to(y.dtype)
    return y
