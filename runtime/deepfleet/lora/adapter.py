"""A LoRA adapter as PEFT publishes it: `adapter_config.json` + `adapter_model.safetensors`.

Read: rank `r`, `lora_alpha`, `use_rslora` (scaling alpha/√r instead of alpha/r), `target_modules`, and per
decoder layer and projection the tensors `…layers.N.self_attn.q_proj.lora_A.weight` [r, in] and `…lora_B.weight`
[out, r]. The scaling is folded into B here, once. What this runtime cannot apply is refused with the reason and
the key, never silently dropped: a rank above max_lora_rank, modules other than the attention and MLP
projections, trained biases, DoRA, per-module rank/alpha patterns, fully trained `modules_to_save`, a missing
file. Whether the shapes fit the served model is checked where the adapter meets it (lora/manager.py)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# the projections of the Qwen2/Llama decoder layer that an adapter may target
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    """The adapter cannot be served; the message names the adapter and the reason."""


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    rank: int
    scaling: float
    base_model: str | None  # adapter_config.json's base_model_name_or_path, for error messages
    # (decoder layer, projection) -> (A [r, in], B [out, r] with the scaling folded in)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def _refuse(name: str, why: str) -> AdapterError:
    return AdapterError(f"LoRA adapter {name!r}: {why}")


def _config(name: str, path: Path, max_rank: int) -> dict:
    if not path.is_dir():
        raise _refuse(name, f"{path}: not a directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise _refuse(name, f"missing file {cfg_path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _refuse(name, f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _refuse(name, f"{cfg_path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _refuse(name, f"peft_type {cfg.get('peft_type')!r}: only LORA adapters are served")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _refuse(name, f"r: expected a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _refuse(name, f"r: rank {rank} exceeds max_lora_rank {max_rank}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise _refuse(name, f"lora_alpha: expected a number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unknown = [m for m in targets if m not in SUPPORTED_MODULES]
        if unknown:
            raise _refuse(name, f"target_modules: unknown module {unknown[0]!r} (LoRA applies to "
                                f"{', '.join(SUPPORTED_MODULES)})")
    unsupported = {
        "use_dora": "DoRA adapters are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) does not apply to these models",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "modules_to_save": "fully trained modules (modules_to_save) are not supported",
    }
    for key, why in unsupported.items():
        if cfg.get(key):
            raise _refuse(name, f"{key}: {why}")
    if cfg.get("bias", "none") != "none":
        raise _refuse(name, f"bias: {cfg['bias']!r}: trained biases are not supported (only 'none')")
    return cfg


def read_adapter(name: str, path: str | Path, max_rank: int) -> LoRAAdapter:
    """Read and check an adapter directory (on the CPU; the manager copies it into its slot)."""
    path = Path(path)
    cfg = _config(name, path, max_rank)
    rank = cfg["r"]
    alpha = cfg.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        bin_only = (path / "adapter_model.bin").is_file()
        alt = " (adapter_model.bin is not read: save with safe_serialization)" if bin_only else ""
        raise _refuse(name, f"missing file {weights_path}{alt}")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                m = _TENSOR.search(key)
                if m is None or m.group(2) not in SUPPORTED_MODULES:
                    raise _refuse(name, f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA weight of a supported "
                                        f"module ({', '.join(SUPPORTED_MODULES)})")
                halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = f.get_tensor(key)
    except SafetensorError as exc:
        raise _refuse(name, f"{weights_path}: not a safetensors file ({exc})") from None
    if not halves:
        raise _refuse(name, f"{WEIGHTS_FILE}: holds no LoRA weights")
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise _refuse(name, f"{where}: lora_{'A' if 'A' not in pair else 'B'} is missing")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise _refuse(name, f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank r={rank}")
        weights[(layer, module)] = (a.float(), b.float() * scaling)
    return LoRAAdapter(name, path, rank, scaling, cfg.get("base_model_name_or_path"), weights)
