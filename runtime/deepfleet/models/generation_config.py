"""A model's `generation_config.json`: the sampling defaults its publisher recommends (e.g. R1's temperature 0.6,
top_p 0.95). As vLLM does (`--generation-config auto`), they apply to requests that leave those fields out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# generation_config.json key -> request field; only keys whose meaning is the same
SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """Request field -> default from MODEL_DIR/generation_config.json ({} without the file)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return {field: raw[key] for key, field in SAMPLING_KEYS.items() if raw.get(key) is not None}
