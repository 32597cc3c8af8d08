"""Node checks: model-weight checksums against the manifest, storage tier mounts, permissions and free space,
listening ports, clock sync, and the runtime's /healthz and /readyz."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
from pathlib import Path

from deepfleet import defaults
from deepfleet.doctor.probe import Probe
from deepfleet.doctor.result import FAIL, OK, WARN, Check
from deepfleet.security.manifest import MANIFEST_NAME, ManifestError, verify_manifest

SERVICE_USER = "deepfleet"  # roles/common and inference_runtime run the server as this user
FREE_WARN, FREE_FAIL = 0.10, 0.02  # share of a filesystem left free


def _mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, str]:
    """mount point -> filesystem type"""
    out = {}
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        out[fields[4].replace("\\040", " ")] = right.split()[0] if right else "?"
    return out


def storage(tier_mounts: dict[str, str], mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Check]:
    mounts, checks = _mounts(mountinfo), []
    for tier, path in tier_mounts.items():
        name = f"{tier} tier {path}"
        if not Path(path).is_dir():
            checks.append(Check("storage", name, WARN, "absent", f"storage_tiers_{tier}_devices: apply roles/"
                                "storage_tiers (playbooks/storage.yml), or ignore on hosts without that tier"))
            continue
        usage = shutil.disk_usage(path)
        free = usage.free / usage.total
        where = f"{mounts[path]} mount" if path in mounts else "not a mount point (on its parent's filesystem)"
        status = FAIL if free < FREE_FAIL else WARN if free < FREE_WARN or path not in mounts else OK
        fix = ("free space or grow the volume" if free < FREE_WARN else
               f"mount its own device (storage_tiers_{tier}_devices)" if path not in mounts else "")
        checks.append(Check("storage", name, status, f"{where}, {usage.free / 2**30:.1f} of "
                            f"{usage.total / 2**30:.1f} GiB free ({free:.0%})", fix))
    return checks


def find_model_dir(hot_mount: str) -> Path | None:
    root = Path(hot_mount)
    if (root / "config.json").is_file():
        return root
    dirs = sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []
    return dirs[0] if dirs else None


def weights(model_dir: Path | None) -> Check:
    if model_dir is None:
        return Check("weights", "manifest", WARN, "no model directory found", "pass --model DIR")
    if not (model_dir / MANIFEST_NAME).is_file():
        return Check("weights", f"manifest {model_dir}", WARN, f"no {MANIFEST_NAME}: the weights cannot be checked",
                     f"deepfleet weights manifest {model_dir} (where the weights were published)")
    try:
        verify_manifest(model_dir)
    except ManifestError as e:
        return Check("weights", f"manifest {model_dir}", FAIL, str(e)[:300],
                     "re-copy the model from its source (deepfleet weights fetch) and restart the runtime")
    except OSError as e:
        return Check("weights", f"manifest {model_dir}", FAIL, f"cannot read: {e}", "check the permissions")
    files = len(json.loads((model_dir / MANIFEST_NAME).read_text())["files"])
    return Check("weights", f"manifest {model_dir}", OK, f"SHA256 of {files} files match")


def permissions(model_dir: Path | None, user: str = SERVICE_USER) -> Check:
    if model_dir is None:
        return Check("permissions", "model directory", WARN, "no model directory found", "pass --model DIR")
    problems = []
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        account = None
    for p in [model_dir, *sorted(model_dir.rglob("*"))]:
        st = p.lstat()
        if st.st_mode & stat.S_IWOTH and not stat.S_ISLNK(st.st_mode):
            problems.append(f"{p} is world-writable")
        if account is not None and not _readable(st, account, p.is_dir()):
            problems.append(f"{p} is not readable by {user}")
    if problems:
        return Check("permissions", f"model directory {model_dir}", FAIL, "; ".join(problems[:3])
                     + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
                     f"chown -R root:{user} {model_dir} && chmod -R u=rwX,g=rX,o= {model_dir}")
    who = f"readable by {user}" if account else f"(no user {user} here: readability not checked)"
    return Check("permissions", f"model directory {model_dir}", OK, f"not world-writable, {who}")


def _readable(st: os.stat_result, account: pwd.struct_passwd, is_dir: bool) -> bool:
    need = (stat.S_IRUSR | (stat.S_IXUSR if is_dir else 0), stat.S_IRGRP | (stat.S_IXGRP if is_dir else 0),
            stat.S_IROTH | (stat.S_IXOTH if is_dir else 0))
    groups = {account.pw_gid, *os.getgrouplist(account.pw_name, account.pw_gid)}
    if account.pw_uid == 0:
        return True
    if st.st_uid == account.pw_uid:
        return st.st_mode & need[0] == need[0]
    if st.st_gid in groups:
        return st.st_mode & need[1] == need[1]
    return st.st_mode & need[2] == need[2]


def ports(ports: dict[str, int], host: str = "127.0.0.1") -> list[Check]:
    checks = []
    for what, port in ports.items():
        try:
            with socket.create_connection((host, port), timeout=1):
                checks.append(Check("ports", f"{what} :{port}", OK, f"accepting connections on {host}:{port}"))
        except OSError as e:
            checks.append(Check("ports", f"{what} :{port}", FAIL, f"{host}:{port}: {e.strerror or e}",
                                f"systemctl status for the {what} service; journalctl -u it"))
    return checks


def clock(probe: Probe) -> Check:
    r = probe.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], timeout=5)
    if r.rc == 0 and r.out.strip() == "yes":
        return Check("clock", "time sync", OK, "NTP synchronised (timedatectl)")
    c = probe.run(["chronyc", "-n", "tracking"], timeout=5)
    if c.rc == 0 and "Leap status     : Normal" in c.out:
        return Check("clock", "time sync", OK, "chrony tracking, leap status normal")
    seen = "not synchronised" if r.rc == 0 else ((r.err.strip().splitlines() or ["timedatectl unavailable"])[0])
    return Check("clock", "time sync", WARN, f"{seen}: JWT expiry, audit timestamps and metrics drift",
                 "install and enable chrony or systemd-timesyncd (hardening role)")


def runtime_health(probe: Probe, port: int = defaults.API_PORT, host: str = "127.0.0.1") -> list[Check]:
    checks = []
    for route in ("/healthz", "/readyz"):
        status, body = probe.http_get(f"http://{host}:{port}{route}")
        name = f"runtime {route}"
        if status == 200:
            checks.append(Check("runtime", name, OK, f"200 {body.strip()[:80]}"))
        elif status is None and "timed out" in body:
            checks.append(Check("runtime", name, FAIL, f"{host}:{port} accepts connections but does not answer "
                                "(hung process)", "py-spy dump --pid $(systemctl show -p MainPID --value "
                                "deepfleet-runtime), then systemctl restart deepfleet-runtime"))
        elif status is None:
            checks.append(Check("runtime", name, FAIL, f"no answer on {host}:{port} ({body[:100]})",
                                "systemctl status deepfleet-runtime; journalctl -u deepfleet-runtime"))
        else:
            state = _json_field(body, "status")
            transient = state in ("loading", "warming_up", "draining")
            checks.append(Check("runtime", name, WARN if transient else FAIL, f"{status} {body.strip()[:120]}",
                                "wait for the warm-up to finish" if transient else
                                "journalctl -u deepfleet-runtime for the load or engine error; restart it"))
    return checks


def _json_field(body: str, key: str) -> str | None:
    try:
        return json.loads(body).get(key)
    except (ValueError, AttributeError):
        return None
