"""The `engine.speculative` setting: `{method: ngram | mtp, num_speculative_tokens: k, prompt_lookup_min,
prompt_lookup_max}`, defined once here; the server settings, the CLI flags and the offline API pass a dict (or
this object) that `parse` checks, naming the offending key."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from deepfleet import defaults

METHODS = ("ngram", "mtp")
KEY = "engine.speculative"


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # ngram: prompt lookup (any model); mtp: the checkpoint's multi-token-prediction layer (DeepSeek-V3)
    num_speculative_tokens: int = defaults.NUM_SPECULATIVE_TOKENS  # drafts per sequence and step
    prompt_lookup_min: int = defaults.PROMPT_LOOKUP_MIN  # ngram: shortest suffix matched against earlier tokens
    prompt_lookup_max: int = defaults.PROMPT_LOOKUP_MAX  # ngram: longest suffix tried first


def parse(value: SpeculativeConfig | dict[str, Any] | None) -> SpeculativeConfig | None:
    """None / {} -> off; a dict -> the checked config; errors name the key and the value."""
    if value is None:
        return None
    if isinstance(value, SpeculativeConfig):
        raw = {f.name: getattr(value, f.name) for f in fields(SpeculativeConfig)}
    elif isinstance(value, dict):
        if not value:
            return None
        raw = dict(value)
    else:
        raise ValueError(f"{KEY}: expected a mapping like {{method: ngram, num_speculative_tokens: 2}}, "
                         f"got {type(value).__name__}")
    known = {f.name for f in fields(SpeculativeConfig)}
    if unknown := sorted(set(raw) - known):
        raise ValueError(f"{KEY}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    method = raw.get("method")
    if method not in METHODS:
        raise ValueError(f"{KEY}.method: must be one of {', '.join(METHODS)}, got {method!r}")
    cfg = SpeculativeConfig(**raw)
    for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{KEY}.{name}: must be an integer >= 1, got {v!r}")
    if cfg.num_speculative_tokens > defaults.MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"{KEY}.num_speculative_tokens: at most {defaults.MAX_SPECULATIVE_TOKENS}, got "
                         f"{cfg.num_speculative_tokens}")
    if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
        raise ValueError(f"{KEY}.prompt_lookup_min: {cfg.prompt_lookup_min} exceeds prompt_lookup_max "
                         f"{cfg.prompt_lookup_max}")
    return cfg


def check_model(cfg: SpeculativeConfig, model_cfg) -> int:
    """The MTP layers the model must build (0 for ngram); refuses MTP on a model without them."""
    if cfg.method != "mtp":
        return 0
    layers = int(model_cfg.get("num_nextn_predict_layers") or 0)
    if model_cfg.arch != "deepseek_v3" or layers < 1:
        raise ValueError(f"{KEY}.method: mtp needs a DeepSeek-V3/R1 checkpoint with num_nextn_predict_layers >= 1 "
                         f"in config.json; {model_cfg.path / 'config.json'} has arch {model_cfg.arch!r} and "
                         f"num_nextn_predict_layers {layers}")
    return 1  # V3/R1 ship one; k > 1 drafts reuse it, as vLLM does
