"""GPU checks from nvidia-smi and the kernel log: devices, driver and CUDA against the roles' matrix, persistence
mode, Fabric Manager (NVSwitch boards), ECC and row remapping, Xid events."""

from __future__ import annotations

import re
from dataclasses import dataclass

from deepfleet.doctor.matrix import Matrix
from deepfleet.doctor.probe import Probe
from deepfleet.doctor.result import FAIL, OK, WARN, Check

_FIELDS = ("index", "name", "driver_version", "persistence_mode", "ecc.mode.current",
           "ecc.errors.uncorrected.volatile.total", "ecc.errors.corrected.volatile.total", "memory.total")
# Xids that mean the GPU or its memory is not to be trusted until it is reset or replaced (NVIDIA's Xid catalogue)
FATAL_XIDS = {48: "double-bit ECC error", 63: "row remapping pending", 64: "row remapping failed",
              74: "NVLink error", 79: "GPU fell off the bus", 92: "high single-bit ECC rate",
              94: "contained ECC error", 95: "uncontained ECC error", 119: "GSP timeout", 120: "GSP error"}
_XID_RE = re.compile(r"NVRM: Xid \(([^)]*)\): (\d+)")


@dataclass
class GPUInfo:
    index: str
    name: str
    driver: str
    persistence: str
    ecc_mode: str
    ecc_uncorrected: str
    ecc_corrected: str
    memory_mib: str


def _int(s: str) -> int | None:
    return int(s) if s.strip().isdigit() else None


def list_gpus(probe: Probe) -> tuple[list[GPUInfo], str]:
    """(GPUs, why there are none)"""
    if probe.which("nvidia-smi") is None:
        return [], "nvidia-smi is not installed (no NVIDIA driver on this host)"
    r = probe.run(["nvidia-smi", f"--query-gpu={','.join(_FIELDS)}", "--format=csv,noheader,nounits"])
    if r.rc != 0:
        return [], f"nvidia-smi failed (rc {r.rc}): {(r.err or r.out).strip()[:200]}"
    gpus = [GPUInfo(*[f.strip() for f in line.split(",")]) for line in r.out.splitlines() if line.count(",") >= 7]
    return gpus, "" if gpus else "nvidia-smi lists no GPU"


def _cuda_of_driver(probe: Probe) -> str | None:
    m = re.search(r"CUDA Version:\s*([\d.]+)", probe.run(["nvidia-smi"]).out)
    return m.group(1) if m else None


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def versions(probe: Probe, gpus: list[GPUInfo], matrix: Matrix | None) -> list[Check]:
    driver = gpus[0].driver
    branch = driver.split(".")[0]
    cuda = _cuda_of_driver(probe)
    names = ", ".join(sorted({g.name for g in gpus}))
    checks = [Check("gpu", "devices", OK, f"{len(gpus)} x {names}, driver {driver}, CUDA {cuda or '?'} (driver API)")]
    if matrix is None:
        checks.append(Check("gpu", "driver/CUDA matrix", WARN, "the roles' version matrix was not found",
                            "pass --roles DIR (the repository's roles/) or set DEEPFLEET_ROLES_DIR"))
        return checks
    src = f"{matrix.roles_dir}/nvidia_driver/defaults/main.yml"
    need = matrix.cuda_min_driver.get(matrix.cuda_version)
    if branch == matrix.driver_branch:
        checks.append(Check("gpu", "driver branch", OK, f"{driver} is the pinned branch {matrix.driver_branch}"))
    elif need is not None and int(branch) >= need:
        checks.append(Check("gpu", "driver branch", WARN,
                            f"{driver} is not the pinned branch {matrix.driver_branch} ({src}); it does run CUDA "
                            f"{matrix.cuda_version} (needs >= {need})",
                            f"pin what runs here: nvidia_driver_branch: \"{branch}\" in the host's group_vars"
                            + ("" if branch in matrix.driver_choices else
                               f" (not among the role's choices {matrix.driver_choices}: add it there first)")))
    else:
        checks.append(Check("gpu", "driver branch", FAIL,
                            f"{driver} is older than CUDA {matrix.cuda_version} needs (driver >= {need})",
                            f"install branch {matrix.driver_branch}: ansible-playbook playbooks/gpu.yml"))
    if cuda is None:
        checks.append(Check("gpu", "CUDA", WARN, "nvidia-smi does not report the driver's CUDA version"))
    elif _version_key(cuda) >= _version_key(matrix.cuda_version):
        checks.append(Check("gpu", "CUDA", OK, f"the driver runs CUDA up to {cuda}; roles pin CUDA "
                                               f"{matrix.cuda_version}"))
    else:
        checks.append(Check("gpu", "CUDA", FAIL, f"the driver runs CUDA up to {cuda}, the roles pin "
                                                 f"{matrix.cuda_version}",
                            "upgrade the driver or lower cuda_version (roles/cuda/defaults/main.yml)"))
    return checks


def persistence(gpus: list[GPUInfo]) -> Check:
    off = [g.index for g in gpus if g.persistence.lower() != "enabled"]
    if not off:
        return Check("gpu", "persistence mode", OK, "enabled on every GPU")
    return Check("gpu", "persistence mode", WARN, f"disabled on GPU {', '.join(off)}: the driver re-initialises on "
                 "each first CUDA call (seconds of start-up)",
                 "systemctl enable --now nvidia-persistenced (nvidia_driver_persistence: true)")


def fabric_manager(probe: Probe, gpus: list[GPUInfo]) -> Check:
    """NVSwitch boards (HGX A100/H100/H200) need Fabric Manager before CUDA can use the GPUs; nvidia-smi -q shows
    the fabric state per GPU, N/A where the board has no NVSwitch."""
    states = re.findall(r"Fabric\s*\n\s*State\s*:\s*([^\n]+)\n\s*Status\s*:\s*([^\n]+)",
                        probe.run(["nvidia-smi", "-q"]).out)
    real = [(s.strip(), st.strip()) for s, st in states if s.strip() not in ("N/A", "Not Supported")]
    if not real:
        return Check("gpu", "fabric manager", OK, f"not needed: no NVSwitch fabric reported ({len(gpus)} GPU)")
    bad = [f"{s}/{st}" for s, st in real if s != "Completed" or st != "Success"]
    if bad:
        return Check("gpu", "fabric manager", FAIL, f"NVSwitch fabric not ready on {len(bad)} GPU(s): {bad[0]}",
                     "systemctl enable --now nvidia-fabricmanager (its version must equal the driver's)")
    return Check("gpu", "fabric manager", OK, f"fabric Completed/Success on {len(real)} GPU(s)")


def ecc(probe: Probe, gpus: list[GPUInfo]) -> list[Check]:
    checks = []
    unc = [(g.index, _int(g.ecc_uncorrected)) for g in gpus if (_int(g.ecc_uncorrected) or 0) > 0]
    cor = [(g.index, _int(g.ecc_corrected)) for g in gpus if (_int(g.ecc_corrected) or 0) > 0]
    off = [g.index for g in gpus if g.ecc_mode.lower() == "disabled"]
    if unc:
        checks.append(Check("gpu", "ECC", FAIL, f"uncorrected ECC errors since boot: {unc}",
                            "drain the host, nvidia-smi -r the GPU; replace it if they recur"))
    elif off:
        checks.append(Check("gpu", "ECC", WARN, f"ECC disabled on GPU {', '.join(off)}",
                            "nvidia-smi -e 1 and reboot (data-centre GPUs should run with ECC)"))
    else:
        mode = "enabled" if any(g.ecc_mode.lower() == "enabled" for g in gpus) else "not supported"
        extra = f", corrected errors {cor}" if cor else ", no errors since boot"
        checks.append(Check("gpu", "ECC", WARN if cor else OK, f"ECC {mode}{extra}",
                            "watch the corrected count; rising counts precede row remapping" if cor else ""))
    r = probe.run(["nvidia-smi", "--query-remapped-rows=gpu_bus_id,remapped_rows.pending,remapped_rows.failure",
                   "--format=csv,noheader"])
    if r.rc == 0 and r.out.strip():
        rows = [[f.strip() for f in line.split(",")] for line in r.out.splitlines() if line.count(",") >= 2]
        failed = [row[0] for row in rows if row[2].lower() in ("yes", "1")]
        pending = [row[0] for row in rows if row[1].lower() in ("yes", "1")]
        if failed:
            checks.append(Check("gpu", "row remapping", FAIL, f"remapping failed on {failed}", "replace the GPU"))
        elif pending:
            checks.append(Check("gpu", "row remapping", WARN, f"remapping pending on {pending}",
                                "drain the host and reset the GPU (nvidia-smi -r) to apply it"))
        else:
            checks.append(Check("gpu", "row remapping", OK, "no pending or failed row remaps"))
    return checks


def xid(probe: Probe) -> Check:
    log = probe.run(["journalctl", "-k", "-b", "--no-pager", "-q", "--grep", "NVRM: Xid"])
    if log.rc not in (0, 1):  # 1: no match
        log = probe.run(["dmesg"])
        if log.rc != 0:
            return Check("gpu", "Xid events", WARN, "cannot read the kernel log (journalctl -k, dmesg)",
                         "run the doctor as root, or in a container with access to the host's kernel log")
    events = [(m.group(1), int(m.group(2))) for m in _XID_RE.finditer(log.out)]
    if not events:
        return Check("gpu", "Xid events", OK, "no NVRM Xid in the kernel log since boot")
    fatal = [(dev, x) for dev, x in events if x in FATAL_XIDS]
    if fatal:
        dev, x = fatal[-1]
        return Check("gpu", "Xid events", FAIL, f"{len(events)} Xid event(s), {len(fatal)} serious, last: Xid {x} "
                     f"({FATAL_XIDS[x]}) on {dev}", "drain the host, reset the GPU; replace it if it recurs")
    return Check("gpu", "Xid events", WARN, f"{len(events)} Xid event(s) since boot, e.g. Xid {events[-1][1]} "
                 "(application-level: a program faulted)", "read journalctl -k | grep Xid for the program")
