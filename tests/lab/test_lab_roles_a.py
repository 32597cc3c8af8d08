"""Lab checks of the GPU/fabric/storage/hardening roles beyond one converge:
- wrong variables fail at the validation step, naming the variable, with nothing changed on the host;
- storage_tiers on real block devices: loop devices made on the controller and handed to a lab host
  (the device node is created inside the container; the role itself only sees block devices). Every lab host
  already has its own tiers on /models, /cache, /logs (lab/disks.py, built by site.yml); this test builds a
  second set beside them on other mount points, so the lab's tiers -- and the model on the hot one -- stay."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.lab

RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def _recap(out: str) -> dict[str, dict[str, int]]:
    return {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "failed": int(m[4])} for m in RECAP.findall(out)}


@pytest.mark.parametrize(
    ("playbook", "extra", "message"),
    [
        ("playbooks/storage.yml", {"storage_tiers_hot_devices": ["/dev/nvme9n1"]},
         "storage_tiers_hot_devices: /dev/nvme9n1 does not exist"),
        ("playbooks/gpu.yml", {"nvidia_driver_branch": "999"},
         "value of nvidia_driver_branch must be one of: 470, 535, 550, 570, 575, 580, got: 999"),
        ("playbooks/gpu.yml", {"cuda_version": "12.4"}, "cuda_version=12.4 needs"),
        ("playbooks/gpu.yml", {"nvidia_driver_branch": "570", "cuda_version": "13.0"}, "cuda_version=13.0 needs"),
        ("playbooks/hardening.yml", {"deepfleet_allowed_networks": ["10.77.0.300/24"]},
         "deepfleet_allowed_networks: '10.77.0.300/24' is not a valid CIDR network"),
        ("playbooks/hardening.yml", {"deepfleet_allowed_networks": "10.77.0.0/24"},
         "deepfleet_allowed_networks must be a list"),
        ("playbooks/fabric.yml", {"rdma_roce_dscp": 99}, "rdma_roce_dscp=99"),
    ],
    ids=["missing-nvme", "driver-branch", "cuda-vs-driver", "cuda13-vs-570", "bad-cidr", "cidr-not-a-list",
         "dscp-range"],
)
def test_bad_input_fails_early_naming_the_variable(lab, playbook, extra, message):
    rc, out = lab.ansible(playbook, "-e", json.dumps(extra))
    assert rc != 0, out[-2000:]
    assert message in " ".join(out.split()), out[-3000:]
    recap = _recap(out)
    assert recap and all(r["changed"] == 0 for r in recap.values()), recap


# ---------------------------------------------------------------- storage tiers on loop devices
TIER_SIZE = "320M"  # mkfs.xfs needs >= 300 MiB
# Not the lab's own tier mount points (/models, /cache, /logs): those hold the converged runtime's model.
TEST_MOUNTS = {"hot": "/looptest/hot", "warm": "/looptest/warm", "cold": "/looptest/cold"}
TEST_UNITS = ["looptest-hot.mount", "looptest-warm.mount", "looptest-cold.mount"]


@pytest.fixture
def loop_devices(lab, tmp_path):
    """Three loop devices on the controller, their nodes created inside the last lab host."""
    if not shutil.which("losetup"):
        pytest.skip("losetup missing on the controller")
    host = lab.hosts[-1]
    devices = []
    try:
        for tier in ("hot", "warm", "cold"):
            img = tmp_path / f"{tier}.img"
            subprocess.run(["truncate", "-s", TIER_SIZE, str(img)], check=True)
            dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True, capture_output=True,
                                 text=True).stdout.strip()
            devices.append(dev)
            minor = int(Path(f"/sys/class/block/{Path(dev).name}/dev").read_text().split(":")[1])
            made = lab.ssh(host, f"[ -b {dev} ] || mknod {dev} b 7 {minor}")
            assert made.returncode == 0, made.stderr
        yield host, devices
    finally:
        lab.ssh(host, f"systemctl disable --now {' '.join(TEST_UNITS)} 2>/dev/null; "
                      f"rm -f {' '.join('/etc/systemd/system/' + u for u in TEST_UNITS)}; systemctl daemon-reload; "
                      f"rm -f {' '.join(devices)}")
        for dev in devices:
            subprocess.run(["losetup", "-d", dev], check=False)


def _overlay_inventory(lab, tmp_path: Path, host: str, hostvars: dict) -> Path:
    """The lab inventory plus host_vars for one host, as a directory inventory testinfra can read too."""
    inv = tmp_path / "inventory"
    (inv / "host_vars").mkdir(parents=True)
    shutil.copy(lab.inventory, inv / "hosts.yml")
    (inv / "host_vars" / f"{host}.yml").write_text(yaml.safe_dump(hostvars))
    return inv


def test_storage_tiers_on_loop_devices(lab, loop_devices, tmp_path):
    host, (hot, warm, cold) = loop_devices
    inv = _overlay_inventory(lab, tmp_path, host.name, {
        "storage_tiers_hot_devices": [hot], "storage_tiers_warm_devices": [warm], "storage_tiers_cold_devices": [cold],
        **{f"storage_tiers_{tier}_mount": mount for tier, mount in TEST_MOUNTS.items()},
    })
    args = ["-i", str(inv), "--limit", host.name, "playbooks/storage.yml"]
    rc, out = lab.ansible(*args)
    assert rc == 0, out[-3000:]
    rc, out = lab.ansible(*args)
    assert rc == 0 and _recap(out)[host.name]["changed"] == 0, out[-3000:]
    rc, out = lab.ansible(*args, "--check", "--diff")
    assert rc == 0 and _recap(out)[host.name]["changed"] == 0, out[-3000:]

    for mount, dev in ((TEST_MOUNTS["hot"], hot), (TEST_MOUNTS["warm"], warm), (TEST_MOUNTS["cold"], cold)):
        found = lab.ssh(host, f"findmnt -no SOURCE,FSTYPE,OPTIONS {mount}").stdout.split()
        assert found[:2] == [dev, "xfs"] and "noatime" in found[2].split(","), (mount, found)
    # the compliance checks of the role, against the same declaration
    cp = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/compliance/test_storage_tiers.py", f"--hosts=ansible://{host.name}", f"--ansible-inventory={inv}",
         "-k", "not raid"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert cp.returncode == 0 and " skipped" not in cp.stdout.splitlines()[-1], cp.stdout[-3000:]

    # restore the host's declared tiers: log rotation back to the archive on the lab's cold tier
    rc, out = lab.ansible("--limit", host.name, "playbooks/storage.yml")
    assert rc == 0, out[-3000:]
    for mount in ("/models", "/cache", "/logs"):  # the lab's own tiers were left alone
        assert lab.ssh(host, f"findmnt -no FSTYPE {mount}").stdout.strip() == "xfs", mount


def test_raid_tier_needs_md_and_says_so(lab, loop_devices, tmp_path):
    """Two devices make an md RAID0. The lab's hosts share this controller's kernel; without md there (no
    /proc/mdstat, and a container cannot load raid0) the role must refuse, naming the tier, before any change.
    The RAID0 path itself runs in `make raid0-vm` (a qemu VM with Debian's kernel, the role and its compliance
    RAID check on two virtio disks), whatever this kernel has."""
    host, (first, second, _) = loop_devices
    if Path("/proc/mdstat").exists():
        pytest.skip("this kernel has md, so there is no refusal to show; the RAID0 build is make raid0-vm's proof")
    inv = _overlay_inventory(lab, tmp_path, host.name, {"storage_tiers_hot_devices": [first, second]})
    rc, out = lab.ansible("-i", str(inv), "--limit", host.name, "playbooks/storage.yml")
    assert rc != 0
    assert "storage_tiers_hot_devices declare(s) several devices (md RAID0)" in " ".join(out.split()), out[-3000:]
    assert _recap(out)[host.name]["changed"] == 0
