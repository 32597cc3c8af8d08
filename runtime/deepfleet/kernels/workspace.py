"""Device buffers that kernels keep zero between launches: the per-block arrival counters by which the last
program of a split reduction (kernels/gemv.py split-K and its add + norm epilogue, kernels/fp8_gemm.py's one-row
GEMV, kernels/paged_attention.py split KV) knows it is last and does the merge in the same launch, and which that
program resets for the next launch and CUDA-graph replay; and the float32 partials those splits leave there.
Launches on the stream run one after another, so every launch of a size shares one buffer of that size."""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, str, int, torch.dtype], torch.Tensor] = {}


def buffer(device: torch.device, what: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero-initialized buffer of `size` elements for `what`, made on first use and kept."""
    key = (device, what, size, dtype)
    if key not in _BUFFERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # made during capture, it would hold nothing until its graph first replays; counters must be zero
            # before any launch, so the first launch of a size has to run eagerly (each graph's warm-up does)
            raise RuntimeError(f"{what}: buffer of {size} first needed during CUDA-graph capture; run eagerly once")
        _BUFFERS[key] = torch.zeros(size, device=device, dtype=dtype)
    return _BUFFERS[key]
