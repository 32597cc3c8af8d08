"""The runtime's serve settings for each tier, checked against the runtime's own schema
(`deepfleet.server.config.ServeSettings`), so a key the runtime does not know fails here, not on a host."""

from __future__ import annotations

from deepfleet.server.config import ServeSettings
from infra.config import Model

# Edge (Jetson): a handful of concurrent sequences in memory shared by CPU and GPU.
EDGE_MAX_NUM_SEQS = 4
EDGE_MEMORY_FRACTION = 0.6


def serve_settings(model: Model, edge: bool = False) -> dict:
    """Settings beyond the runtime's defaults. A full queue answers 503 (not 429) so the router retries the
    request on the next priority (cloud); 429 stays reserved for per-client rate limits, which must not spill."""
    if edge:
        engine = {
            "dtype": "float16",
            "max_model_len": model.edge_max_model_len,
            "max_num_seqs": EDGE_MAX_NUM_SEQS,
            "gpu_memory_utilization": EDGE_MEMORY_FRACTION,
        }
        settings = {"served_model_name": model.edge_name, "queue_full_status": 503, "engine": engine}
    else:
        settings = {"served_model_name": model.name, "queue_full_status": 503, "engine": {"dtype": model.dtype}}
    ServeSettings.model_validate({"model": model.local_path, **settings})
    return settings


def set_flags(settings: dict, prefix: str = "") -> list[str]:
    """`deepfleet serve --set key=value` flags for the settings (nested keys dotted)."""
    flags: list[str] = []
    for key, value in settings.items():
        if isinstance(value, dict):
            flags += set_flags(value, f"{prefix}{key}.")
        else:
            flags += ["--set", f"{prefix}{key}={value}"]
    return flags
