"""Which quantization a model loads with: read from config.json's `quantization_config` (DeepSeek-V3/R1's published
block-FP8 checkpoints) or requested with `engine.quantization: fp8` for a bf16 checkpoint (the R1 distills).

The published format: weights float8_e4m3fn, one float32 `weight_scale_inv` per 128×128 block (the dequantized
weight is fp8 · scale_inv; the last block of a dimension may be partial, e.g. kv_a_proj_with_mqa's 576 rows),
activations quantized on the fly per token and group of 128 input features (`activation_scheme: dynamic`).

Quantizing a bf16 checkpoint on load uses the same 128×128 block scales rather than one scale per output channel:
- accuracy: a block scale adapts to 128 input features at a time, so one outlier column of the weight costs
  precision only inside its block instead of along the whole row; per-channel scales are never finer along K.
- speed: both cost one scale per weight tile in a kernel that streams 128-wide K tiles (a 128×128 tile reads
  16 KiB of FP8 and one 4-byte scale: 0.02% more bytes), so the small-batch weight-streaming kernel runs at the same
  speed either way. Per-channel scales would only pay off with a vendor GEMM that has a row/column-scaled epilogue
  (torch._scaled_mm), which the issue measured at 0.70× bf16 at batch 1.
- one format means one set of kernels, loaders and tests for DeepSeek-V3 and the distills alike.
The dense layers' shard boundaries (q/k/v, gate/up) must fall on 128-row blocks; every R1 distill's do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_METHODS = ("fp8",)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores


@dataclass(frozen=True)
class QuantSpec:
    method: str  # "fp8"
    block: tuple[int, int]  # (rows, input features) per scale
    from_checkpoint: bool  # True: the files hold FP8 + weight_scale_inv; False: bf16/fp16/fp32 quantized on load

    def linear(self, in_features: int, out_features: int | list[int], bias: bool):
        from deepfleet.quant.linear import Fp8Linear

        return Fp8Linear(in_features, out_features, bias, self)


def _checkpoint_spec(qcfg: Any, where: str) -> QuantSpec:
    if not isinstance(qcfg, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {qcfg!r}")
    method = qcfg.get("quant_method")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"{where}: quantization_config.quant_method={method!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_METHODS)}; AWQ/GPTQ/bitsandbytes checkpoints are not)")
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{where}: quantization_config.fmt={fmt!r} is not supported (e4m3)")
    scheme = qcfg.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"{where}: quantization_config.activation_scheme={scheme!r} is not supported (dynamic)")
    block = qcfg.get("weight_block_size")
    if block is None:
        raise ValueError(f"{where}: quantization_config.weight_block_size is missing: per-tensor FP8 checkpoints "
                         "are not supported, only block-scaled ones such as DeepSeek-V3's [128, 128]")
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{where}: quantization_config.weight_block_size={block!r} must be two positive integers")
    if ignored := qcfg.get("modules_to_not_convert") or qcfg.get("ignored_layers"):
        raise ValueError(f"{where}: quantization_config lists unquantized modules ({ignored[:3]}...), "
                         "which is not supported")
    return QuantSpec("fp8", (block[0], block[1]), from_checkpoint=True)


def resolve(raw_config: dict, config_path: Path, requested: str | None) -> QuantSpec | None:
    """The quantization a model loads with. `requested` is engine.quantization (None: as the checkpoint is)."""
    qcfg = raw_config.get("quantization_config")
    if requested not in (None, "fp8"):
        raise ValueError(f"quantization: {requested!r} is not supported (fp8, or unset for the checkpoint's own)")
    if qcfg:
        return _checkpoint_spec(qcfg, str(config_path))
    if requested == "fp8":
        return QuantSpec("fp8", (128, 128), from_checkpoint=False)
    return None


def check_device(spec: QuantSpec | None, device: torch.device) -> None:
    """FP8 needs FP8 tensor cores on CUDA; CPU runs the dequantizing reference (tests, tiny models)."""
    if spec is None or device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"device {device} ({name}, compute capability {cap[0]}.{cap[1]}) has no FP8 support "
                         f"(needs {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+: Ada or Hopper); "
                         "serve a bf16 checkpoint instead")
