"""Thin wrappers over the kernel objects the lab uses: commands, processes (by PID + start time), cgroups."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from lab.config import LabError


def run(cmd: list[str], *, check: bool = True, input: str | None = None, env: dict | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    try:
        cp = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError as e:
        raise LabError(f"missing dependency: {cmd[0]}", "run `make deps`") from e
    if check and cp.returncode != 0:
        detail = (cp.stderr or cp.stdout).strip().splitlines()[-5:]
        raise LabError(f"`{' '.join(cmd)}` failed (exit {cp.returncode}): " + " | ".join(detail))
    return cp


# ---------------------------------------------------------------- kernel objects, by name
def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def nft_table_exists(table: str) -> bool:
    return run(["nft", "list", "table", "inet", table], check=False).returncode == 0


def mounts() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def is_mount(path: Path) -> bool:
    """From the mount table: os.path.ismount compares devices and misses a bind mount within one file system
    (`ip netns add` bind-mounts /run/netns onto itself, and /run is not always a tmpfs)."""
    return str(path) in mounts()


# ---------------------------------------------------------------- processes
def starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has finished: only its parent's wait() is missing
        return None
    return int(fields[19])


def alive(rec: dict) -> bool:
    """True when the recorded process still runs (same PID *and* same start time: PIDs get reused)."""
    return starttime(rec["pid"]) == rec["start"]


def identity(pid: int) -> dict:
    return {"pid": pid, "start": starttime(pid)}


def wait_gone(pred, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def terminate(rec: dict, timeout: float = 10.0) -> None:
    """SIGTERM the recorded process's group (it was started as a session leader), SIGKILL after `timeout`."""
    if not alive(rec):
        return
    try:
        os.killpg(rec["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_gone(lambda: not alive(rec), timeout):
        try:
            os.killpg(rec["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_gone(lambda: not alive(rec), 5)


# ---------------------------------------------------------------- cgroups
def _self_cgroups() -> list[Path]:
    """Where this process sits in the cgroup2 tree and (on hybrid hosts) the name=systemd v1 tree."""
    mounts: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _, opts = post.split()[:3]
        mnt = pre.split()[4]
        if fstype == "cgroup2":
            mounts.setdefault("", mnt)
        elif fstype == "cgroup" and "name=systemd" in opts.split(","):
            mounts.setdefault("name=systemd", mnt)
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrl, path = line.split(":", 2)
        if ctrl in mounts:
            out.append(Path(mounts[ctrl]) / path.lstrip("/"))
    return out


def cgroup_create(name: str) -> list[str]:
    """A private cgroup beside our own in each tree systemd uses: systemd-nspawn creates its `payload` and
    `supervisor` cgroups inside the cgroup it starts in, so two containers must never start in the same one."""
    paths = []
    for parent in _self_cgroups():
        p = parent / name
        if p.exists():
            raise LabError(f"cgroup {p} exists already but is not recorded by this lab", f"remove it: rmdir {p}")
        p.mkdir()
        paths.append(str(p))
    return paths


def cgroup_joiner(paths: list[str]):
    """preexec_fn: move the child into `paths` before it execs."""

    def join():
        for p in paths:
            with open(Path(p) / "cgroup.procs", "w") as fh:
                fh.write("0")

    return join


def cgroup_pids(paths: list[str]) -> set[int]:
    pids: set[int] = set()
    for p in paths:
        for procs in Path(p).rglob("cgroup.procs"):
            try:
                pids.update(int(x) for x in procs.read_text().split())
            except (FileNotFoundError, OSError):
                pass
    return pids


def cgroup_kill(paths: list[str]) -> None:
    """Kill every process in the recorded cgroups (cgroup.kill where the kernel has it)."""
    for p in paths:
        kill_file = Path(p) / "cgroup.kill"
        if kill_file.exists():
            kill_file.write_text("1")
    for pid in cgroup_pids(paths):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cgroup_remove(paths: list[str]) -> None:
    for p in paths:
        root = Path(p)
        if not root.exists():
            continue
        dirs = sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
        for d in [*dirs, root]:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
