"""Lab settings and input validation: everything here is pure (no root, no side effects) so it is unit-tested."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE_ROOT = REPO / "lab" / ".state"
INVENTORY_ROOT = REPO / "inventory" / "lab"
# Shared across checkouts and runs on purpose: the apt cache and the debootstrapped root filesystem.
CACHE_ROOT = Path(os.environ.get("DEEPFLEET_LAB_CACHE", "/var/cache/deepfleet-lab"))
GLOBAL_LOCK = Path("/run/lock/deepfleet-lab.lock")

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Enough to boot systemd, accept SSH and run Ansible (python3-apt for the apt module). Other roles install the rest.
ROOTFS_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "iproute2", "sudo", "procps",
)
# Bump when the way the cached root filesystem is prepared changes (part of the cache key).
ROOTFS_RECIPE = 1

MIN_HOSTS, MAX_HOSTS, DEFAULT_HOSTS = 1, 8, 2
SUBNET_BASE = "10.77"  # each instance takes a free 10.77.X.0/24
HOST_OFFSET = 10  # lab-1 is .11
APT_PORT_RANGE = range(3142, 3242)
SSH_TIMEOUT_S = 90
# Every lab host gets one sparse file-backed loop device per storage tier (lab/disks.py); mkfs.xfs needs
# >= 300 MiB. One device per tier: several would make an md RAID0, and this kernel may have no md driver.
TIER_SIZES_MIB = {"hot": 512, "warm": 320, "cold": 320}
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
IFNAMSIZ = 15  # Linux interface names: at most 15 characters


class LabError(Exception):
    """A problem the user can fix: `message` says what is wrong, `fix` what to do about it."""

    def __init__(self, message: str, fix: str = "", code: int = 1):
        super().__init__(message)
        self.message, self.fix, self.code = message, fix, code


class BadInput(LabError):
    def __init__(self, message: str, fix: str = ""):
        super().__init__(message, fix, code=2)


def default_name(repo: Path = REPO) -> str:
    """One lab per checkout: a fresh CI clone and a lab left up by hand elsewhere never share a name."""
    return "lab-" + hashlib.sha1(str(repo).encode()).hexdigest()[:6]


@dataclass(frozen=True)
class Names:
    """Every kernel object of one instance carries the instance's tag (a hash of its state directory)."""

    tag: str

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> Names:
        return cls(hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:8])

    @property
    def bridge(self) -> str:
        return f"df{self.tag}b"

    @property
    def nft_table(self) -> str:
        return f"deepfleet_lab_{self.tag}"

    def veth(self, i: int) -> str:
        return f"df{self.tag}v{i}"

    def veth_peer(self, i: int) -> str:
        return f"df{self.tag}p{i}"

    def netns(self, i: int) -> str:
        return f"df{self.tag}n{i}"

    def machine(self, i: int) -> str:
        return f"df{self.tag}-lab-{i}"

    def cgroup(self, what: str) -> str:
        return f"deepfleet-lab-{self.tag}-{what}"


def host_name(i: int) -> str:
    return f"lab-{i}"


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise BadInput(
            f"invalid lab name {name!r}",
            "use 1-32 characters: lowercase letters, digits and '-', starting with a letter (e.g. --name mylab)",
        )
    return name


def validate_hosts(n: int) -> int:
    if not MIN_HOSTS <= n <= MAX_HOSTS:
        raise BadInput(
            f"invalid host count {n}: the lab runs {MIN_HOSTS} to {MAX_HOSTS} hosts",
            f"pass --hosts N with {MIN_HOSTS} <= N <= {MAX_HOSTS} (default {DEFAULT_HOSTS})",
        )
    return n


def port_free(port: int) -> bool:
    """True when nothing listens on `port` on any address (the apt proxy binds the bridge address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def validate_port(port: int | None) -> int | None:
    if port is None:
        return None
    if not 1024 <= port <= 65535:
        raise BadInput(f"invalid apt proxy port {port}", "pass --apt-port from 1024 to 65535, or leave it out")
    if not port_free(port):
        raise BadInput(
            f"port clash: port {port} is already in use on this machine",
            f"pick another --apt-port, or leave it out to take a free one (see `ss -ltnp 'sport = :{port}'`)",
        )
    return port


def pick_port(taken: set[int] = frozenset()) -> int:
    for port in APT_PORT_RANGE:
        if port not in taken and port_free(port):
            return port
    raise LabError(
        f"no free port for the lab's apt proxy or object store in {APT_PORT_RANGE.start}-{APT_PORT_RANGE.stop - 1}",
        "free one of these ports or pass --apt-port",
    )


# command -> Debian package that ships it
REQUIRED_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "apt-cacher-ng": "apt-cacher-ng",
    "ip": "iproute2",
    "nft": "nftables",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "losetup": "mount",
}


def ensure_sbin_on_path() -> None:
    """debootstrap, ip and nft live in sbin directories that a non-login shell's PATH may lack."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    missing = [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in parts]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*parts, *missing])


def check_tools(which=shutil.which) -> None:
    missing = [f"{cmd} (package {pkg})" for cmd, pkg in REQUIRED_TOOLS.items() if which(cmd) is None]
    if missing:
        raise LabError("missing dependency: " + ", ".join(missing), "run `make deps` (installs the lab's apt packages)")


def check_kernel(filesystems: str | None = None) -> None:
    text = Path("/proc/filesystems").read_text() if filesystems is None else filesystems
    if "overlay" not in text.split():
        raise LabError("the kernel has no overlay filesystem (the hosts boot from overlays of one cached tree)",
                       "load it (`modprobe overlay`) or run on a kernel with CONFIG_OVERLAY_FS")


def check_root(euid: int | None = None) -> None:
    if (os.geteuid() if euid is None else euid) != 0:
        raise LabError(
            "the lab needs root (network namespaces, a bridge, systemd-nspawn)",
            "run it as root, e.g. `sudo make lab` or `sudo .venv/bin/python -m lab up`",
        )
