"""The FP8 linear layer: weight float8_e4m3fn [N, K] and float32 `weight_scale_inv` [N/128, K/128] (block scales,
as DeepSeek publishes them), created directly in FP8 so memory never holds a bf16 copy. On CUDA it runs the
block-FP8 kernels (deepfleet.kernels.fp8_gemm); on CPU it dequantizes and multiplies in the compute dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepfleet.quant import fp8
from deepfleet.quant.spec import QuantSpec


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None, gemv_tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] (compute dtype) · dequantized(weight)ᵀ (+ bias); one row with `gemv_tiles`: the one-row GEMV at
    those tiles, else the measured table's choice."""
    if x.is_cuda:
        from deepfleet.kernels import fp8_gemm

        rows = x.reshape(-1, x.shape[-1])
        config = fp8_gemm.gemv_config(gemv_tiles) if gemv_tiles is not None and rows.shape[0] == 1 else None
        out = fp8_gemm.fp8_matmul(rows, weight, scale, block, bias, config=config)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, fp8.dequantize(weight, scale, block, x.dtype), bias)


class Fp8Linear(nn.Module):
    """Drop-in for layers.Linear (same fused-shard interface): `out_features` as a list fuses checkpoint tensors;
    each shard's `.weight` and `.weight_scale_inv` load into its rows."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool, spec: QuantSpec):
        super().__init__()
        self.block, self.from_checkpoint = spec.block, spec.from_checkpoint
        self.shard_sizes = list(out_features) if isinstance(out_features, list | tuple) else [out_features]
        self.shard_offsets = [sum(self.shard_sizes[:i]) for i in range(len(self.shard_sizes))]
        self.in_features, self.out_features = in_features, sum(self.shard_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=fp8.FP8), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(fp8.scale_shape(self.out_features, in_features, self.block), dtype=torch.float32),
            requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        fused = len(self.shard_sizes) > 1
        shards = list(range(len(self.shard_sizes))) if fused else [None]
        self.weight.weight_loader = self._load_weight
        self.weight_scale_inv.weight_loader = self._load_scale
        self.weight.raw_checkpoint_tensor = self.weight_scale_inv.raw_checkpoint_tensor = True
        self.weight.expected_shards = shards
        # quantized on load: the scales are computed, not read
        self.weight_scale_inv.expected_shards = shards if self.from_checkpoint else []
        if self.bias is not None:
            self.bias.weight_loader = self._load_bias
            self.bias.expected_shards = shards

    def _rows(self, shard: int | None) -> tuple[int, int]:
        if shard is None:
            return 0, self.out_features
        if not 0 <= shard < len(self.shard_sizes):
            raise ValueError(f"shard index {shard} out of range")
        return self.shard_offsets[shard], self.shard_sizes[shard]

    def _load(self, tensor: torch.Tensor, shard: int | None, is_scale: bool) -> None:
        row0, n = self._rows(shard)
        fp8.load_rows(self.weight.data.narrow(0, row0, n), self.weight_scale_inv.data, tensor, row0, is_scale,
                      self.block, self.from_checkpoint)

    def _load_weight(self, _param, tensor: torch.Tensor, shard: int | None = None) -> None:
        self._load(tensor, shard, is_scale=False)

    def _load_scale(self, _param, tensor: torch.Tensor, shard: int | None = None) -> None:
        if not self.from_checkpoint:
            raise ValueError("the checkpoint has FP8 scales but no quantization_config")
        self._load(tensor, shard, is_scale=True)

    def _load_bias(self, param, tensor: torch.Tensor, shard: int | None = None) -> None:
        row0, n = self._rows(shard)
        target = param.data.narrow(0, row0, n)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {tuple(target.shape)}")
        target.copy_(tensor)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return fp8.dequantize(self.weight, self.weight_scale_inv, self.block, dtype)

    # batch-1 tiles (kernels/fp8_gemm.py GEMV_CANDIDATES) of the one-row GEMV for this layer, alone and with the
    # following residual add + RMSNorm, or None (the measured table's choice; the two launches): set per model by
    # models/layers.py choose_gemv, as for layers.Linear
    gemv_tiles: tuple[int, int, int, int] | None = None
    gemv_norm_tiles: tuple[int, int, int, int] | None = None

    def gemv_candidates(self) -> list[tuple[int, int, int, int]]:
        from deepfleet.kernels import fp8_gemm

        return [t for t in fp8_gemm.GEMV_CANDIDATES if self.block[0] % t[0] == 0]  # (rows within one scale block)

    def gemv(self, x: torch.Tensor, tiles: tuple[int, int, int, int], silu_mul: bool = False) -> torch.Tensor:
        """One row x [1, K]: the one-row GEMV at `tiles`; `silu_mul` (a fused [gate; up] layer): silu(gate)·up."""
        from deepfleet.kernels import fp8_gemm

        if silu_mul:
            return fp8_gemm.gemv_silu_mul(x, self.weight, self.weight_scale_inv, self.block, self.bias,
                                          fp8_gemm.gemv_config(tiles))
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias, tiles)

    def gemv_add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module,
                      tiles: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One row: (norm(self(x) + residual), self(x) + residual) in one launch of the one-row GEMV at `tiles`."""
        from deepfleet.kernels import fp8_gemm

        return fp8_gemm.gemv_add_norm(x, self.weight, self.weight_scale_inv, self.block, self.bias, residual,
                                      norm.weight, norm.eps, fp8_gemm.gemv_config(tiles))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias, self.gemv_tiles)
