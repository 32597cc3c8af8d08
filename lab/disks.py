"""Block devices of the lab hosts: one sparse file per storage tier under the host's state directory, attached
to a loop device on the controller, its device node made inside the host (as tests/lab's `loop_devices`
fixture does). The generated inventory declares them as storage_tiers_{hot,warm,cold}_devices, so the storage
play of site.yml builds real XFS tiers in `make lab`.

A loop device is known by its backing file, not by its number: `down` detaches whatever loop device is backed
by the recorded file (the number may have been reused by someone else after a reboot of the controller)."""

from __future__ import annotations

import os
from pathlib import Path

from lab import system
from lab.config import TIER_SIZES_MIB, LabError

SYS_BLOCK = Path("/sys/block")
LOOP_CONTROL = Path("/dev/loop-control")


def check_loop_support(control: Path = LOOP_CONTROL) -> None:
    if not control.exists():
        raise LabError(
            f"the kernel offers no loop devices ({control} is missing): the lab hosts' storage tiers are "
            "loop devices over sparse files",
            "load the driver (`modprobe loop`) or run on a kernel with CONFIG_BLK_DEV_LOOP",
        )


def backed_by(file: str, sys_block: Path | None = None) -> list[str]:
    """/dev/loopN for every loop device whose backing file is `file` (also once the file was deleted)."""
    found = []
    for backing in sorted((sys_block or SYS_BLOCK).glob("loop*/loop/backing_file")):
        try:
            name = backing.read_text().strip()
        except OSError:  # detached meanwhile
            continue
        if name in (file, f"{file} (deleted)"):
            found.append(f"/dev/{backing.parent.parent.name}")
    return found


def attached_under(directory: Path, sys_block: Path | None = None) -> list[str]:
    """'/dev/loopN (FILE)' for every loop device backed by a file below `directory` (a lab whose state was lost)."""
    prefix = str(directory.resolve()) + os.sep
    found = []
    for backing in sorted((sys_block or SYS_BLOCK).glob("loop*/loop/backing_file")):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name.startswith(prefix):
            found.append(f"/dev/{backing.parent.parent.name} ({name})")
    return found


def dev_numbers(device: str, sys_block: Path | None = None) -> tuple[int, int]:
    major, minor = ((sys_block or SYS_BLOCK) / Path(device).name / "dev").read_text().strip().split(":")
    return int(major), int(minor)


def attach(state, host, disk_dir: Path, log=print) -> None:
    """One sparse backing file + loop device per tier for `host`, each recorded the moment it exists: the file
    as a `path`, the device as a `loop` (recorded before losetup runs, so an interrupted attach is undone too)."""
    disk_dir.mkdir(parents=True, exist_ok=True)
    for tier, size_mib in TIER_SIZES_MIB.items():
        img = disk_dir / f"{tier}.img"
        state.record("path", path=str(img))
        with open(img, "xb") as fh:  # sparse: costs only what the filesystem writes into it
            fh.truncate(size_mib * 1024 * 1024)
        res = state.record("loop", host=host.name, tier=tier, file=str(img), size_mib=size_mib, device="")
        cp = system.run(["losetup", "--find", "--show", str(img)], check=False)
        if cp.returncode != 0:
            detail = (cp.stderr or cp.stdout).strip()
            raise LabError(
                f"could not attach a loop device for the {tier} tier of {host.name}: {detail}",
                "free a loop device (`losetup -a` lists them, `losetup -d /dev/loopN` detaches one; "
                "`make lab-down` removes the lab's own) or allow more (`modprobe loop max_loop=64`)",
            )
        res["device"] = cp.stdout.strip()
        state.save()
    log(f"    {host.name}: " + ", ".join(f"{r['tier']} {r['device']}" for r in host_loops(state, host.name)))


def make_nodes(state, host, ssh) -> None:
    """Create the host's loop device nodes inside the container (its /dev is a private tmpfs) and prove that
    the container can read them. `ssh(state, host, command)` runs a command on the host."""
    for res in host_loops(state, host.name):
        dev = res["device"]
        major, minor = dev_numbers(dev)
        cp = ssh(state, host, f"[ -b {dev} ] || mknod -m 0660 {dev} b {major} {minor}; "
                              f"chown root:disk {dev} && head -c 4096 {dev} > /dev/null")
        if cp.returncode != 0:
            raise LabError(f"{host.name}: cannot create or read the device node {dev} ({major}:{minor}) inside "
                           f"the container: {cp.stderr.strip()[-300:]}",
                           "the container needs CAP_MKNOD and access to block devices (no device cgroup)")


def host_loops(state, host_name: str) -> list[dict]:
    return [r for r in state.resources if r["kind"] == "loop" and r["host"] == host_name and r.get("device")]


def tier_devices(state, host_name: str) -> dict[str, list[str]]:
    """tier -> [device] of a host, as storage_tiers_<tier>_devices wants it (one device per tier: this
    kernel has no md driver, so a several-device RAID0 tier cannot be built in the lab)."""
    return {r["tier"]: [r["device"]] for r in host_loops(state, host_name)}


def attached(res: dict, sys_block: Path | None = None) -> bool:
    """The recorded loop device still exists and is still backed by the recorded file."""
    return bool(res.get("device")) and res["device"] in backed_by(res["file"], sys_block)


def undo_loop(res: dict, sys_block: Path | None = None) -> None:
    """Detach every loop device backed by the recorded file. A device still open (the container's mount not
    yet released) is detached by the kernel once its last user closes it: wait for that."""
    for dev in backed_by(res["file"], sys_block):
        system.run(["losetup", "--detach", dev], check=False)
    if not system.wait_gone(lambda: not backed_by(res["file"], sys_block), 15):
        raise LabError(f"loop device(s) {backed_by(res['file'], sys_block)} still attached to {res['file']}",
                       "something still uses it (see `losetup -a`, `findmnt`); run `down` again")
