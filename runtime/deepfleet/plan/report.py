"""One planning run: resolve the model (preset name, model directory or bare config.json), size it, place it on
every GPU type and tensor-parallel size asked for, add host needs and the cost comparison. The result is a plain
dict (what `--json` prints); render.py draws it for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepfleet.plan import capacity, cost, hardware
from deepfleet.plan.footprint import WEIGHT_DTYPES, footprint, model_config
from deepfleet.plan.presets import ALIASES, PRESETS, preset


def read_model(source: str) -> tuple[str, dict[str, Any], Path]:
    """(name, config.json contents, the path errors name)"""
    raw = preset(source)
    if raw is not None:
        return ALIASES.get(source.lower(), source.lower()), raw, Path(f"preset:{source}")
    path = Path(source)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"model: {source!r} is neither a preset ({', '.join(PRESETS)}), a model directory with a "
                         "config.json, nor a config.json file")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    return (path.name if path.is_dir() else path.parent.name or file.name), raw, file.parent


def plan(source: str, dtype: str | None = None, context: int = 8192, gpus: list[str] | None = None,
         tp_sizes: list[int] | None = None, memory_utilization: float = 0.9, cloud_monthly: float | None = None,
         onprem_capex: float | None = None, onprem_monthly: float | None = None, power_kw: float = 0.0,
         power_price_per_kwh: float = 0.0) -> dict[str, Any]:
    if context < 1:
        raise ValueError(f"context: must be >= 1, got {context}")
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization: must be in (0, 1], got {memory_utilization}")
    for tp in tp_sizes or []:
        if tp < 1:
            raise ValueError(f"tp: must be >= 1, got {tp}")
    name, raw, where = read_model(source)
    cfg, checkpoint_dtype = model_config(raw, where)
    dtype = dtype or checkpoint_dtype or (cfg.torch_dtype if cfg.torch_dtype in WEIGHT_DTYPES else "bfloat16")
    fp = footprint(name, cfg, dtype)
    placements = []
    for g in [hardware.gpu(k) for k in gpus] if gpus else hardware.GPUS:
        for tp in tp_sizes or capacity.TP_SIZES:
            if (reason := capacity.valid_tp(fp, g, tp)) is not None:
                if tp_sizes:  # asked for explicitly: say why it is left out
                    placements.append({"gpu": g.key, "tp": tp, "fits": False, "why": reason, "invalid": True})
                continue
            placements.append(capacity.place(fp, g, tp, context, memory_utilization).as_dict())
    pay = cost.payback(
        cost.EXAMPLE_CLOUD_MONTHLY if cloud_monthly is None else cloud_monthly,
        cost.EXAMPLE_ONPREM_CAPEX if onprem_capex is None else onprem_capex,
        cost.EXAMPLE_ONPREM_MONTHLY if onprem_monthly is None else onprem_monthly,
        power_kw, power_price_per_kwh,
    )
    return {"model": fp.as_dict(), "context": context, "memory_utilization": memory_utilization,
            "host": capacity.host_requirements(fp), "gpus": {g.key: g.as_dict() for g in hardware.GPUS},
            "placements": placements, "cost": pay.as_dict()}
