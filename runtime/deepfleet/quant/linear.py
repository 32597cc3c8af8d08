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
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (compute dtype) · dequantized(weight)ᵀ (+ bias)."""
    if x.is_cuda:
        from deepfleet.kernels.fp8_gemm import fp8_matmul

        out = fp8_matmul(x.reshape(-1, x.shape[-1]), weight, scale, block, bias)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias)
