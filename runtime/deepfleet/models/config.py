"""Reading a Hugging Face `config.json`: the architecture, the dtype, and the fields every model shares."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepfleet.quant.spec import QuantSpec
from deepfleet.quant.spec import resolve as resolve_quantization

# config.json `architectures` entry -> deepfleet model family
ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    path: Path
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    torch_dtype: str
    eos_token_ids: list[int]
    raw: dict[str, Any] = field(repr=False)
    quantization: QuantSpec | None = None  # the checkpoint's own (quantization_config); engine.quantization may add

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    @property
    def rope_theta(self) -> float:
        """The RoPE base: transformers >= 5 writes it inside `rope_parameters`, earlier versions (and most published
        checkpoints) at the top level."""
        return float(_rope_parameters(self.raw).get("rope_theta", self.raw.get("rope_theta", 10000.0)))

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """The RoPE scaling variant and its parameters, None for plain RoPE: `rope_parameters` (transformers >= 5)
        or the older `rope_scaling`."""
        params = _rope_parameters(self.raw) or self.raw.get("rope_scaling") or {}
        return params if (params.get("rope_type") or params.get("type") or "default") != "default" else None

    def require(self, key: str) -> Any:
        if key not in self.raw or self.raw[key] is None:
            raise ValueError(f"{self.path / 'config.json'}: field {key!r} is required for {self.arch}")
        return self.raw[key]


def _rope_parameters(raw: dict[str, Any], path: str = "config.json") -> dict[str, Any]:
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        # transformers keys rope_parameters by layer type for models that mix attention kinds: not these
        raise ValueError(f"{path}: rope_parameters={params!r} is not supported (one set for every layer)")
    return params


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return parse_config(raw, Path(model_dir))


def parse_config(raw: dict[str, Any], model_dir: Path) -> ModelConfig:
    """A config.json's contents -> ModelConfig; errors name `model_dir/config.json` and the field."""
    path = model_dir / "config.json"
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
    if not known:
        raise ValueError(
            f"{path}: architectures={archs!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    quantization = resolve_quantization(raw, path, None)  # a bad quantization_config fails here, before loading
    eos = raw.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    cfg = ModelConfig(
        path=model_dir,
        arch=known[0],
        vocab_size=0,
        hidden_size=0,
        num_layers=0,
        num_heads=0,
        num_kv_heads=0,
        max_position_embeddings=0,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        eos_token_ids=eos_ids,
        raw=raw,
        quantization=quantization,
    )
    cfg.vocab_size = int(cfg.require("vocab_size"))
    cfg.hidden_size = int(cfg.require("hidden_size"))
    cfg.num_layers = int(cfg.require("num_hidden_layers"))
    cfg.num_heads = int(cfg.require("num_attention_heads"))
    cfg.num_kv_heads = int(raw.get("num_key_value_heads") or cfg.num_heads)
    cfg.max_position_embeddings = int(cfg.require("max_position_embeddings"))
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"{path}: hidden_act={raw['hidden_act']!r} is not supported (silu)")
    _rope_parameters(raw, str(path))  # refused here, before any weight is read
    if raw.get("use_sliding_window"):
        raise ValueError(f"{path}: use_sliding_window=true is not supported (full attention only)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"{path}: num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` takes config.json's torch_dtype, except on CPU where half precision is slow: float32 there."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        name = cfg.torch_dtype if cfg.torch_dtype in DTYPES else "bfloat16"
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not supported (choose auto, {', '.join(DTYPES)})")
    return DTYPES[name]
