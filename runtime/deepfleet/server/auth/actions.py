"""Which policy action each route needs. Routes not listed need `update` (admin-only), so an endpoint added
later is closed to inference users until it is listed here on purpose."""

from __future__ import annotations

import fnmatch

OPEN = ("/healthz", "/health", "/readyz")  # probes of the kubelet and the load balancer carry no token
METRICS = "/metrics"
ADMIN_PREFIX = "/admin/"

ROUTE_ACTIONS: tuple[tuple[str, str], ...] = (
    ("/v1/chat/completions", "predict"),
    ("/v1/completions", "predict"),
    ("/v1/embeddings", "predict"),
    ("/v1/models", "predict"),
    ("/v1/models/*", "predict"),
    ("/tokenize", "predict"),
    ("/detokenize", "predict"),
    ("/docs", "predict"),
    ("/docs/*", "predict"),
    ("/openapi.json", "predict"),
    ("/version", "predict"),
    ("/admin/audit", "read_logs"),
    ("/admin/models/*/load", "deploy"),
    ("/admin/models/*/unload", "delete"),
    ("/admin/policy/reload", "update"),
    ("/v1/load_lora_adapter", "deploy"),  # LoRA adapters are deployed and removed like models (model_admin)
    ("/v1/unload_lora_adapter", "delete"),
)
DEFAULT_ACTION = "update"


def action_for(path: str) -> str:
    for pattern, action in ROUTE_ACTIONS:
        if fnmatch.fnmatchcase(path, pattern):
            return action
    return DEFAULT_ACTION
