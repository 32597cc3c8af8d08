"""NCCL: the environment and /etc/nccl.conf the nccl role writes, whether the interfaces and HCAs they name exist,
and a short nccl-tests all_reduce run when the binary is installed."""

from __future__ import annotations

import os
import re
from pathlib import Path

from deepfleet.doctor.matrix import Matrix
from deepfleet.doctor.probe import Probe
from deepfleet.doctor.result import FAIL, OK, WARN, Check

NCCL_CONF = Path("/etc/nccl.conf")
NCCL_TESTS = (Path("/opt/nccl-tests/build/all_reduce_perf"),)  # nccl_tests_dir of roles/nccl


def _settings(env: dict[str, str], conf: Path) -> dict[str, str]:
    found = {}
    if conf.is_file():
        for line in conf.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                found[k.strip()] = v.strip()
    found.update({k: v for k, v in env.items() if k.startswith("NCCL_")})
    return found


def environment(env: dict[str, str] | None = None, conf: Path = NCCL_CONF,
                net: Path = Path("/sys/class/net"), ib: Path = Path("/sys/class/infiniband")) -> list[Check]:
    s = _settings(os.environ if env is None else env, conf)
    if not s:
        return [Check("nccl", "environment", WARN, f"no NCCL_* variables and no {conf}: NCCL picks interfaces itself",
                      "apply roles/nccl (playbooks/fabric.yml) on multi-node hosts")]
    checks = [Check("nccl", "environment", OK, ", ".join(f"{k}={v}" for k, v in sorted(s.items())))]
    for name in filter(None, re.split(r"[,\s]+", s.get("NCCL_SOCKET_IFNAME", "").lstrip("^="))):
        if not (net / name).exists() and not any(p.name.startswith(name) for p in net.glob("*")):
            checks.append(Check("nccl", "NCCL_SOCKET_IFNAME", FAIL, f"interface {name!r} does not exist",
                                "set nccl_socket_ifname to an interface of `ip -br link`"))
    for hca in filter(None, re.split(r"[,\s]+", s.get("NCCL_IB_HCA", "").lstrip("^="))):
        if not (ib / hca.split(":")[0]).exists():
            checks.append(Check("nccl", "NCCL_IB_HCA", FAIL, f"RDMA device {hca!r} not in {ib}",
                                "set nccl_ib_hca to devices of `ibv_devices` (rdma_roce role)"))
    return checks


def all_reduce(probe: Probe, num_gpus: int, matrix: Matrix | None, timeout: float = 60) -> Check:
    binary = next((p for p in NCCL_TESTS if p.is_file()), None)
    if binary is None:
        return Check("nccl", "nccl-tests", WARN, "all_reduce_perf not installed: no bandwidth figure",
                     "apply roles/nccl (it builds nccl-tests into /opt/nccl-tests)")
    r = probe.run([str(binary), "-b", "8M", "-e", "256M", "-f", "2", "-g", str(num_gpus)], timeout=timeout)
    m = re.search(r"Avg bus bandwidth\s*:\s*([\d.]+)", r.out)
    if r.rc != 0 or m is None:
        return Check("nccl", "nccl-tests", FAIL, f"all_reduce_perf -g {num_gpus} failed (rc {r.rc}): "
                     f"{(r.err or r.out).strip()[-200:]}", "run it by hand with NCCL_DEBUG=INFO")
    busbw = float(m.group(1))
    floor = matrix.nccl_min_busbw if matrix else None
    if num_gpus > 1 and floor and busbw < floor:
        return Check("nccl", "nccl-tests", FAIL, f"all_reduce bus bandwidth {busbw} GB/s < {floor} GB/s "
                     "(nccl_validate_min_busbw)", "check NVLink (nvidia-smi nvlink -s) and P2P (nvidia-smi topo -m)")
    return Check("nccl", "nccl-tests", OK, f"all_reduce_perf on {num_gpus} GPU(s): avg bus bandwidth {busbw} GB/s")
