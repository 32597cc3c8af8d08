"""The environment of a worker process: the parent's, plus the NCCL settings the `nccl` Ansible role renders into
/etc/nccl.conf (KEY=VALUE lines; also the systemd EnvironmentFile of the runtime service, so under systemd they are
already set and the environment wins), plus the multicast switches that must stay off."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

NCCL_CONF = Path("/etc/nccl.conf")
# NVLink SHARP / multicast must stay off on the lent machines (device KINDS.md) and on any host we did not qualify it
# on: set in every process that may initialise NCCL, whatever the inherited environment says.
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def read_nccl_conf(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped. A missing file is no settings."""
    if not path.is_file():
        return {}
    settings = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        settings[key.strip()] = value.strip()
    return settings


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    conf = Path(environ.get("DEEPFLEET_NCCL_CONF", str(NCCL_CONF)))
    return {**read_nccl_conf(conf), **environ, **NCCL_SAFE_ENV}
