"""Loading a Hugging Face model directory into a deepfleet model.

Parameters are allocated uninitialised (`torch.empty`) directly in the target dtype on the target device; each
checkpoint tensor is then read through `safe_open` (memory-mapped) one at a time, converted and copied into its
parameter, so CPU memory never holds a second full copy of the weights. Every expected tensor must be present with
the right shape; errors name the file and the tensor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from deepfleet.models.config import ModelConfig
from deepfleet.models.layers import default_weight_loader
from deepfleet.quant import building
from deepfleet.quant.fp8 import FP8
from deepfleet.quant.spec import QuantSpec, check_device
from deepfleet.quant.spec import resolve as resolve_quantization
from deepfleet.security.serving import encrypted_model

log = logging.getLogger(__name__)


def model_class(cfg: ModelConfig):
    if cfg.arch in ("qwen2", "llama"):
        from deepfleet.models.qwen2 import Qwen2ForCausalLM

        return Qwen2ForCausalLM
    from deepfleet.models.deepseek_v3 import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM


def checkpoint_files(model_dir: Path) -> dict[Path, list[str] | None]:
    """safetensors file -> tensor names the index assigns to it (None when there is no index)."""
    if (enc := encrypted_model(model_dir)) is not None:  # shards stay encrypted on disk (security/serving.py)
        return dict.fromkeys(model_dir / rel for rel in enc.weight_files())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from e
        files: dict[Path, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(model_dir / fname, []).append(name)
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {index.name} but missing")
        return files
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights found")
    return dict.fromkeys(found)


def verify_manifest_if_present(model_dir: Path) -> None:
    if not (model_dir / "deepfleet-manifest.json").is_file():
        return
    try:
        from deepfleet.security.manifest import verify_manifest
    except ImportError as e:
        raise RuntimeError(f"{model_dir}/deepfleet-manifest.json: present but cannot be verified ({e})") from e
    verify_manifest(model_dir)


def open_checkpoint(path: Path, device: torch.device):
    """safe_open, or the in-memory reader of an encrypted model's shard (decrypted, authenticated, hash-checked)."""
    enc = encrypted_model(path.parent)
    return enc.open_weights(path.name) if enc is not None else safe_open(str(path), framework="pt", device=str(device))


def load_weights(model: nn.Module, model_dir: Path, device: torch.device) -> None:
    params = dict(model.named_parameters())
    loaded: set[tuple[str, object]] = set()
    for path, names in checkpoint_files(model_dir).items():
        try:
            handle = open_checkpoint(path, device)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
        with handle as f:
            keys = set(f.keys())
            if names is not None and (absent := sorted(set(names) - keys)):
                raise ValueError(f"{path}: the index lists tensors the file lacks, e.g. {absent[:3]}")
            for name in sorted(keys):
                target = model.param_for(name)
                if target is None:
                    continue
                pname, shard = target
                if pname not in params:
                    log.warning("%s: tensor %s is not used by %s", path.name, name, type(model).__name__)
                    continue
                param = params[pname]
                index = getattr(param, "tp_index", None)
                if index is None:
                    tensor = f.get_tensor(name)
                else:  # tensor parallel: read only this rank's slice of the memory-mapped tensor
                    sliced = f.get_slice(name)
                    where = index(shard, tuple(sliced.get_shape()))
                    if where is None:
                        continue  # held by another rank
                    tensor = sliced[where]
                try:
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    if getattr(param, "raw_checkpoint_tensor", False):  # quantized layers read (or quantize) it
                        loader(param, tensor, shard)
                    elif tensor.dtype == FP8:  # casting it would drop its block scales: a silently wrong model
                        raise ValueError(f"FP8 tensor for {pname}, which is not quantized here (config.json has "
                                         "no fp8 quantization_config, or this layer is never FP8)")
                    else:
                        loader(param, tensor.to(param.dtype), shard)
                except ValueError as e:
                    raise ValueError(f"{path}: tensor {name}: {e}") from e
                loaded.add((pname, shard))
    missing = [
        f"{name}" + ("" if shard is None else f"[shard {shard}]")
        for name, p in params.items()
        for shard in getattr(p, "expected_shards", [None])
        if (name, shard) not in loaded
    ]
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}")


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights in place (benchmarks of real shapes without multi-GB files, like vLLM's load_format=dummy).
    FP8 weights get values of unit spread and block scales of 0.02: the same dequantized spread as the others.
    Split parameters draw each checkpoint tensor in full and keep their slice, so every tensor-parallel size gets
    the same model from the same seed."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dtype == FP8:
            for row in p.data.view(-1, p.shape[-1]).split(4096):  # bounded float32 scratch for huge expert stacks
                row.copy_(torch.randn(row.shape, device=row.device, generator=gen).clamp(-8, 8))
        elif name.endswith("_scale_inv"):
            p.data.fill_(0.02)
        elif name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif p.dim() == 1:
            p.data.zero_()
        elif not hasattr(p, "full_shards"):
            p.data.normal_(0.0, 0.02, generator=gen)
        else:
            for shard, shape in p.full_shards:
                full = torch.empty(shape, dtype=p.dtype, device=p.device).normal_(0.0, 0.02, generator=gen)
                where = p.tp_index(shard, shape)
                if where is not None:
                    p.weight_loader(p, full[where], shard)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
                quantization: QuantSpec | None = None, mtp_layers: int = 0) -> nn.Module:
    """The model with uninitialised parameters in `dtype` on `device` (the "meta" device: shapes only, no memory);
    under `quantization` its projections are FP8 layers (default: the checkpoint's own quantization_config).
    `mtp_layers`: DeepSeek-V3's multi-token-prediction layers to build too (speculative decoding's draft)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device, building(quantization or cfg.quantization):
            return model_class(cfg)(cfg, max_positions, **({"mtp_layers": mtp_layers} if mtp_layers else {}))
    finally:
        torch.set_default_dtype(previous)


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
               load_format: str = "auto", quantization: str | None = None, mtp_layers: int = 0) -> nn.Module:
    """`quantization`: engine.quantization ("fp8" quantizes a bf16 checkpoint on load; None: as the checkpoint)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format: {load_format!r} is not supported (auto, dummy)")
    spec = resolve_quantization(cfg.raw, cfg.path / "config.json", quantization)
    check_device(spec, device)
    if load_format == "auto":
        verify_manifest_if_present(cfg.path)
    model = build_model(cfg, dtype, device, max_positions, spec, mtp_layers)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, cfg.path, device)
    for module in list(model.modules()):  # derived weights (e.g. MLA's absorbed projections), once loaded
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading(dtype)
    return model.eval()
