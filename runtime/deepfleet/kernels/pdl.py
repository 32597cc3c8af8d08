"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of the batch-1 decode chain.

Why. At batch 1 a decode step is ~170 short launches in a row (1.5B: 28 layers × QKV, RoPE + cache write,
attention, O + norm, gate_up + SiLU, down + norm), each a few microseconds, and between two of them the GPU drains
the first grid before it starts the next: launch latency and the ramp of the next grid are paid ~170 times. A
kernel launched with PDL may be started while the kernel before it in the stream is still running; its programs
then wait (`griddepcontrol.wait`, here `enter`) until that kernel has finished and its writes are visible. So the
next grid is resident and waiting when the previous one ends. Captured CUDA graphs keep the dependency as a
programmatic edge.

The rule every PDL kernel keeps: `enter(PDL)` before its first access to memory another kernel writes or reads
(activations, caches, workspaces, counters). Only weights may be read before it. A kernel launched without PDL
(torch's, cuBLAS) waits for the previous kernel as usual, and a PDL kernel that follows it waits for it in
`enter`, so mixing them is safe. `enter` also lets the next kernel start early (`launch_dependents`): it is called
first, as every program of this kernel is resident by then. The interpreter (CPU) has no griddepcontrol: PDL is off
there."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels writing next to `t` launch with PDL (a CUDA tensor on a Hopper or later GPU)."""
    return t.is_cuda and _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_options(pdl: bool) -> dict:
    """The kernel call's keyword for a PDL launch (none otherwise: the interpreter knows no such option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def enter(PDL: tl.constexpr):
    """Start of a PDL kernel: let the next kernel launch, then wait for the previous one to finish."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
