"""The runtime's security in Kubernetes: the Secrets of `workload.security` mounted read-only (mode 0440, the
pod's fsGroup reads them), the runtime settings that point at them (validated against the runtime's own schema),
the audit log on a writable emptyDir bounded twice (the runtime's own rotation at audit.max_bytes keeps it below
the emptyDir's sizeLimit, past which the kubelet would evict the pod), and what changes with TLS: HTTPS probes,
the `https` port of the container and the Service, and the ServiceMonitor scraping over TLS with the Secret's CA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deepfleet.defaults import AUDIT_BACKUPS
from deepfleet.server.config import ServeSettings
from infra.config import WorkloadSecurity

MOUNT_ROOT = "/etc/deepfleet"
AUDIT_DIR = "/var/log/deepfleet"
SECRET_MODE = 0o440
# sizeLimit over the files' own bound: filesystem blocks, and the kubelet measures only now and then
AUDIT_HEADROOM = 1.25


@dataclass
class PodSecurity:
    volumes: list[dict] = field(default_factory=list)
    mounts: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def _secret(name: str, secret: str, items: list[str]) -> dict:
    return {"name": name, "secret": {"secretName": secret, "defaultMode": SECRET_MODE,
                                     "items": [{"key": k, "path": k} for k in items]}}


def pod_security(sec: WorkloadSecurity, model_path: str) -> PodSecurity:
    out = PodSecurity()
    out.volumes.append({"name": "audit", "emptyDir": {"sizeLimit": f"{audit_size_limit_mib(sec)}Mi"}})
    out.mounts.append({"name": "audit", "mountPath": AUDIT_DIR})
    out.settings["audit"] = {"path": f"{AUDIT_DIR}/audit.jsonl", "max_bytes": sec.audit_max_mib << 20}
    mounts = [("tls", sec.tls_secret, ["tls.crt", "tls.key"]),
              ("auth", sec.auth_secret, ["jwks.json", "policy.yaml"]),
              ("weights-key", sec.weights_key_secret, ["weights.key"])]
    for name, secret, items in mounts:
        if secret:
            out.volumes.append(_secret(name, secret, items))
            out.mounts.append({"name": name, "mountPath": f"{MOUNT_ROOT}/{name}", "readOnly": True})
    if sec.tls_secret:
        out.settings["tls"] = {"cert_file": f"{MOUNT_ROOT}/tls/tls.crt", "key_file": f"{MOUNT_ROOT}/tls/tls.key"}
    if sec.auth_secret:
        auth = {"jwks_file": f"{MOUNT_ROOT}/auth/jwks.json", "policy_file": f"{MOUNT_ROOT}/auth/policy.yaml"}
        auth.update({k: v for k, v in (("issuer", sec.issuer), ("audience", sec.audience)) if v})
        out.settings["auth"] = auth
    if sec.weights_key_secret:
        out.settings["weights"] = {"key_file": f"{MOUNT_ROOT}/weights-key/weights.key"}
    ServeSettings.model_validate({"model": model_path, **out.settings})  # a key the runtime lacks fails here
    return out


def audit_size_limit_mib(sec: WorkloadSecurity) -> int:
    """The audit emptyDir's sizeLimit: the current file and AUDIT_BACKUPS rotated ones of audit_max_mib each."""
    return math.ceil((AUDIT_BACKUPS + 1) * sec.audit_max_mib * AUDIT_HEADROOM)


def port_name(sec: WorkloadSecurity) -> str:
    return "https" if sec.tls_secret else "http"


def probe_scheme(sec: WorkloadSecurity) -> str:
    return "HTTPS" if sec.tls_secret else "HTTP"


def scrape_endpoint(sec: WorkloadSecurity, service_dns: str) -> dict:
    """The ServiceMonitor endpoint for the runtime's /metrics (open to scrapes; TLS verified with the CA)."""
    endpoint = {"port": port_name(sec), "path": "/metrics", "interval": "15s"}
    if sec.tls_secret:
        endpoint |= {"scheme": "https", "tlsConfig": {"ca": {"secret": {"name": sec.tls_secret, "key": "ca.crt"}},
                                                      "serverName": service_dns, "minVersion": "TLS13"}}
    return endpoint
