"""The hosts' root filesystem: debootstrapped once through the apt proxy into a directory cached for all
checkouts (keyed by suite, mirror, package list and recipe). Each host boots an overlay of it: the cached tree
is the read-only lower layer, the host's own changes go to its upper layer, so a host costs no copy to make
and little to delete."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from lab import system
from lab.config import CACHE_ROOT, MIRROR, ROOTFS_PACKAGES, ROOTFS_RECIPE, SUITE, LabError
from lab.state import locked

APT_CONF = """\
// deepfleet lab: the hosts reach Debian only through the apt proxy on the lab bridge
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
"""


def cache_key() -> str:
    text = "\n".join([SUITE, MIRROR, ",".join(sorted(ROOTFS_PACKAGES)), str(ROOTFS_RECIPE)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_dir(cache_root: Path = CACHE_ROOT) -> Path:
    return cache_root / f"rootfs-{SUITE}-{cache_key()}"


def ensure_base(apt_proxy: str, log=print) -> Path:
    """Return the cached root filesystem, building it (once, under a lock) if it is missing."""
    base = base_dir()
    with locked(CACHE_ROOT / ".rootfs.lock"):
        if base.is_dir():
            log(f"==> root filesystem: cached {base}")
            return base
        log(f"==> root filesystem: debootstrap {SUITE} through the apt proxy (first run only, ~1-2 min)")
        t0 = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE_ROOT))
        try:
            root = build / "root"
            env = {**os.environ, "http_proxy": apt_proxy, "DEBIAN_FRONTEND": "noninteractive"}
            cp = system.run(
                ["debootstrap", "--variant=minbase", "--include=" + ",".join(ROOTFS_PACKAGES),
                 SUITE, str(root), MIRROR],
                check=False, env=env,
            )
            if cp.returncode != 0:
                (CACHE_ROOT / "debootstrap-failed.log").write_text(cp.stdout + cp.stderr)
                tail = " | ".join((cp.stdout + cp.stderr).strip().splitlines()[-4:])
                raise LabError(
                    f"debootstrap failed (exit {cp.returncode}): {tail}",
                    f"see {CACHE_ROOT / 'debootstrap-failed.log'}; the hosts' packages come from {MIRROR} "
                    "through the lab's apt proxy",
                )
            _generalize(root)
            if not base.is_dir():  # (another writer that ignored the lock may have won)
                os.replace(root, base)  # atomic: a half-built tree never has the cached name
        finally:
            shutil.rmtree(build, ignore_errors=True)
        log(f"    built {base} in {time.monotonic() - t0:.0f} s")
        return base


def _generalize(root: Path) -> None:
    """Strip what must differ per host (SSH host keys, machine id) and the downloaded packages."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() and not dbus_id.is_symlink():
        dbus_id.unlink()
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (root / d).glob("*"):
            if f.is_file():
                f.unlink()
    (root / "etc/apt/apt.conf.d/00deepfleet-lab").write_text(APT_CONF)
    (root / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")


def overlay_options(base: Path, host_dir: Path) -> str:
    return f"lowerdir={base},upperdir={host_dir / 'upper'},workdir={host_dir / 'work'}"


def personalize(root: Path, *, hostname: str, hosts: dict[str, str], authorized_key: str, apt_proxy: str) -> None:
    """Give one host (its mounted root) its identity: name, fresh SSH host keys, the lab key, the apt proxy."""
    (root / "etc/hostname").write_text(hostname + "\n")
    lines = ["127.0.0.1 localhost", f"127.0.1.1 {hostname}", "::1 localhost ip6-localhost ip6-loopback"]
    lines += [f"{ip} {name}" for name, ip in hosts.items()]
    (root / "etc/hosts").write_text("\n".join(lines) + "\n")
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("# deepfleet lab: no DNS; apt goes through the proxy by address\n")
    (root / "etc/machine-id").write_text("")  # systemd generates a fresh one on first boot
    system.run(["ssh-keygen", "-q", "-A", "-f", str(root)])
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(authorized_key)
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    (root / "etc/apt/apt.conf.d/01deepfleet-lab-proxy").write_text(f'Acquire::http::Proxy "{apt_proxy}";\n')
    # The package lists were dropped from the cached tree: mark them stale so that Ansible's
    # `apt: update_cache: true, cache_valid_time: N` (which looks at this mtime) fetches them.
    os.utime(root / "var/lib/apt/lists", (0, 0))
