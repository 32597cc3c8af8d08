"""One doctor run: every check in order, GPU checks only where a GPU is, the rest always."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deepfleet import defaults
from deepfleet.doctor import gpu, nccl, node
from deepfleet.doctor.matrix import Matrix, find_roles_dir, load_matrix
from deepfleet.doctor.probe import Probe
from deepfleet.doctor.result import FAIL, OK, WARN, Check

# where the roles put things when the matrix cannot be read (storage_tiers and loadbalancer defaults)
FALLBACK_TIERS = {"hot": "/models", "warm": "/cache", "cold": "/logs"}
FALLBACK_LB_PORT = 8080


@dataclass
class Options:
    model_dir: Path | None = None
    roles_dir: str | None = None
    api_port: int = defaults.API_PORT
    require_gpu: bool = False
    nccl_tests: bool = True


def diagnose(opts: Options, probe: Probe | None = None) -> list[Check]:
    probe = probe or Probe()
    checks: list[Check] = []
    matrix: Matrix | None = None
    roles = find_roles_dir(opts.roles_dir)
    if roles is None:
        checks.append(Check("matrix", "roles", WARN, "the roles' version matrix was not found",
                            "pass --roles DIR (the repository's roles/) or set DEEPFLEET_ROLES_DIR"))
    else:
        try:
            matrix = load_matrix(roles)
            checks.append(Check("matrix", "roles", OK, f"{roles}: driver {matrix.driver_branch}, CUDA "
                                f"{matrix.cuda_version}, NCCL {matrix.nccl_version_by_cuda.get(matrix.cuda_version)}"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            checks.append(Check("matrix", "roles", FAIL, f"{roles}: cannot read the matrix ({e})",
                                "pass --roles pointing at the repository's roles/"))
    gpus, why = gpu.list_gpus(probe)
    if gpus:
        checks += gpu.versions(probe, gpus, matrix)
        checks += [gpu.persistence(gpus), gpu.fabric_manager(probe, gpus), *gpu.ecc(probe, gpus), gpu.xid(probe)]
    else:
        checks.append(Check("gpu", "devices", FAIL if opts.require_gpu else WARN,
                            f"no GPU: {why}; GPU, driver, ECC, Xid and nccl-tests checks skipped, the rest run",
                            "apply playbooks/gpu.yml on GPU hosts" if opts.require_gpu else ""))
    checks += nccl.environment()
    if gpus and opts.nccl_tests:
        checks.append(nccl.all_reduce(probe, len(gpus), matrix))
    tiers = matrix.tier_mounts if matrix else FALLBACK_TIERS
    checks += node.storage(tiers)
    model_dir = opts.model_dir or node.find_model_dir(tiers["hot"])
    checks += [node.weights(model_dir), node.permissions(model_dir)]
    wanted = {"runtime API": opts.api_port}
    if probe.which("haproxy") or Path("/etc/haproxy/haproxy.cfg").is_file():
        wanted["load balancer"] = matrix.lb_port if matrix else FALLBACK_LB_PORT
    checks += node.ports(wanted)
    checks.append(node.clock(probe))
    checks += node.runtime_health(probe, opts.api_port)
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


__all__ = ["FAIL", "OK", "WARN", "Options", "diagnose", "exit_code"]
