"""The driver/CUDA/NCCL versions the roles pin, read from the roles' own defaults files (the one place they are
written): nvidia_driver_branch and its allowed choices, cuda_version and cuda_matrix (min_driver per release),
nccl_packages_by_cuda, nccl_validate_min_busbw, and the storage tier mount points."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROLES_ENV = "DEEPFLEET_ROLES_DIR"
_MARKER = Path("nvidia_driver") / "defaults" / "main.yml"


@dataclass
class Matrix:
    roles_dir: Path
    driver_branch: str
    driver_choices: list[str]
    cuda_version: str
    cuda_min_driver: dict[str, int]
    nccl_version_by_cuda: dict[str, str]
    nccl_min_busbw: float
    tier_mounts: dict[str, str]
    lb_port: int


def find_roles_dir(explicit: str | None = None) -> Path | None:
    """--roles, else $DEEPFLEET_ROLES_DIR, else the roles/ of the checkout this package runs from."""
    for candidate in (explicit, os.environ.get(ROLES_ENV)):
        if candidate:
            return Path(candidate)
    for parent in Path(__file__).resolve().parents:
        if (parent / "roles" / _MARKER).is_file():
            return parent / "roles"
    return None


def _yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def _key(data: dict, key: str, path: Path):
    if key not in data:
        raise ValueError(f"{path}: {key} is missing")
    return data[key]


def load_matrix(roles_dir: Path) -> Matrix:
    drv_path, cuda_path = roles_dir / _MARKER, roles_dir / "cuda" / "defaults" / "main.yml"
    nccl_path = roles_dir / "nccl" / "defaults" / "main.yml"
    tiers_path = roles_dir / "storage_tiers" / "defaults" / "main.yml"
    lb_path = roles_dir / "loadbalancer" / "defaults" / "main.yml"
    spec_path = roles_dir / "nvidia_driver" / "meta" / "argument_specs.yml"
    drv, cuda, nccl, tiers = _yaml(drv_path), _yaml(cuda_path), _yaml(nccl_path), _yaml(tiers_path)
    spec = _yaml(spec_path)
    choices = spec["argument_specs"]["main"]["options"]["nvidia_driver_branch"].get("choices", [])
    matrix = _key(cuda, "cuda_matrix", cuda_path)
    nccl_pkgs = _key(nccl, "nccl_packages_by_cuda", nccl_path)
    nccl_versions = {}
    for release, pkgs in nccl_pkgs.items():
        m = re.search(r"libnccl2=([\d.]+)", " ".join(pkgs))
        if m:
            nccl_versions[str(release)] = m.group(1)
    return Matrix(
        roles_dir=roles_dir,
        driver_branch=str(_key(drv, "nvidia_driver_branch", drv_path)),
        driver_choices=[str(c) for c in choices],
        cuda_version=str(_key(cuda, "cuda_version", cuda_path)),
        cuda_min_driver={str(r): int(e["min_driver"]) for r, e in matrix.items()},
        nccl_version_by_cuda=nccl_versions,
        nccl_min_busbw=float(_key(nccl, "nccl_validate_min_busbw", nccl_path)),
        tier_mounts={t: str(_key(tiers, f"storage_tiers_{t}_mount", tiers_path)) for t in ("hot", "warm", "cold")},
        lb_port=int(_key(_yaml(lb_path), "loadbalancer_port", lb_path)),
    )
