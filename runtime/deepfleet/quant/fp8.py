"""The block-FP8 weight format: float8_e4m3fn values, one float32 `scale_inv` per (rows × cols) block, dequantized
= value · scale_inv. Plain PyTorch: quantize (on load), dequantize (the CPU path and the kernels' reference), and
loading one checkpoint tensor into a range of rows of a layer's FP8 weight and scales."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_SUFFIX = "_scale_inv"  # checkpoint: <name>.weight + <name>.weight_scale_inv


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return cdiv(rows, block[0]), cdiv(cols, block[1])


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[..., R, C] block scales -> [..., rows, cols] one per element (partial last blocks cut)."""
    s = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return s[..., :rows, :cols]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 [..., rows, cols] with [..., R, C] block scales -> `dtype` (computed in float32)."""
    rows, cols = weight.shape[-2:]
    return (weight.float() * _expand(scale_inv.float(), rows, cols, block)).to(dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> (FP8 [rows, cols], float32 scale_inv [R, C]): each block's largest |value| maps to 448."""
    rows, cols = weight.shape
    r, c = scale_shape(rows, cols, block)
    padded = torch.zeros(r * block[0], c * block[1], dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(r, block[0], c, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(r * block[0], c * block[1])[:rows, :cols].contiguous(), scale_inv


def load_rows(weight: torch.Tensor, scale: torch.Tensor, tensor: torch.Tensor, row0: int, is_scale: bool,
              block: tuple[int, int], from_checkpoint: bool) -> None:
    """Load one checkpoint tensor into rows [row0, row0 + n) of an FP8 `weight` [N, K] and its `scale` [R, C].

    `tensor` is the checkpoint's `.weight` (FP8 when `from_checkpoint`, else any float dtype, quantized here) or,
    with `is_scale`, its `.weight_scale_inv`. `weight` is a view of the layer's rows for this tensor's part of a
    fused layer; row0 is where that part starts (it must start a block: its scales are rows of `scale`)."""
    if row0 % block[0]:
        raise ValueError(f"block size {block[0]} does not divide the row offset {row0} of this tensor in its fused "
                         "layer (its scale blocks would straddle two tensors)")
    rows, cols = weight.shape
    r0 = row0 // block[0]
    blocks = scale_shape(rows, cols, block)
    if is_scale:
        if tuple(tensor.shape) != blocks:
            raise ValueError(f"scale shape {tuple(tensor.shape)} does not match the {blocks} blocks of "
                             f"{block[0]}x{block[1]} that its weight {(rows, cols)} needs")
        scale[r0 : r0 + blocks[0]].copy_(tensor.float())
        return
    if tuple(tensor.shape) != (rows, cols):
        raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {(rows, cols)}")
    if from_checkpoint:
        if tensor.dtype != FP8:
            raise ValueError(f"dtype {tensor.dtype} where quantization_config (fp8, e4m3) needs float8_e4m3fn")
        weight.copy_(tensor)
        return
    if not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1:
        raise ValueError(f"dtype {tensor.dtype} cannot be quantized on load (expected bf16/fp16/fp32)")
    q, s = quantize(tensor.to(weight.device), block)
    weight.copy_(q)
    scale[r0 : r0 + blocks[0]].copy_(s)
