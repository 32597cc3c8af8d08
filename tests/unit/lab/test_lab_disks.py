"""The lab hosts' storage-tier loop devices: recorded as they are made, declared in the inventory, undone by
backing file (never by a device number alone), and clear errors when the controller cannot provide them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lab import config, disks, instance, inventory, teardown
from lab.config import LabError
from lab.state import Host, State, load


@pytest.fixture(autouse=True)
def private_state_root(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "STATE_ROOT", tmp_path / "state")
    return tmp_path / "state"


@pytest.fixture
def sys_block(tmp_path, monkeypatch):
    """A fake /sys/block: attach(dev, file) makes loopN look backed by `file`, detach(dev) removes that."""
    root = tmp_path / "sys-block"
    root.mkdir()
    monkeypatch.setattr(disks, "SYS_BLOCK", root)

    class Fake:
        path = root

        @staticmethod
        def attach(dev: str, file: str) -> None:
            d = root / Path(dev).name
            (d / "loop").mkdir(parents=True)
            (d / "loop" / "backing_file").write_text(file + "\n")
            (d / "dev").write_text(f"7:{Path(dev).name[4:]}\n")

        @staticmethod
        def detach(dev: str) -> None:
            d = root / Path(dev).name / "loop"
            (d / "backing_file").unlink()
            d.rmdir()

    return Fake


def _host(name: str = "lab-1") -> Host:
    return Host(name=name, ip="10.77.1.11", machine="m", netns="n", veth="v", root="/nonexistent")


def _fake_losetup(sys_block, free: list[str], log: list[list[str]]):
    """losetup --find --show FILE takes the next of `free` (fails when none is left); --detach DEV detaches."""

    def run(cmd, check=True, **_kw):
        log.append(cmd)
        if cmd[:3] == ["losetup", "--find", "--show"]:
            if not free:
                return subprocess.CompletedProcess(cmd, 1, "", "losetup: cannot find an unused loop device")
            dev = free.pop(0)
            sys_block.attach(dev, cmd[3])
            return subprocess.CompletedProcess(cmd, 0, dev + "\n", "")
        if cmd[:2] == ["losetup", "--detach"]:
            sys_block.detach(cmd[2])
            return subprocess.CompletedProcess(cmd, 0, "", "")
        raise AssertionError(cmd)

    return run


def test_backed_by_matches_the_file_also_once_deleted(sys_block):
    sys_block.attach("/dev/loop3", "/s/hot.img")
    sys_block.attach("/dev/loop4", "/s/hot.img (deleted)")
    sys_block.attach("/dev/loop5", "/s/hot.img2")
    assert disks.backed_by("/s/hot.img", sys_block.path) == ["/dev/loop3", "/dev/loop4"]
    assert disks.dev_numbers("/dev/loop5", sys_block.path) == (7, 5)


def test_attach_records_each_file_and_device_and_the_inventory_declares_them(sys_block, monkeypatch, tmp_path):
    calls: list[list[str]] = []
    monkeypatch.setattr(disks.system, "run", _fake_losetup(sys_block, ["/dev/loop7", "/dev/loop8", "/dev/loop9"],
                                                           calls))
    state = State.new("t1")
    host = _host()
    state.hosts.append(host)
    disks.attach(state, host, tmp_path / "disks", log=lambda *_: None)

    kinds = [(r["kind"], Path(r.get("path") or r.get("file")).name) for r in state.resources]
    assert kinds == [("path", "hot.img"), ("loop", "hot.img"), ("path", "warm.img"), ("loop", "warm.img"),
                     ("path", "cold.img"), ("loop", "cold.img")]
    for tier, size in config.TIER_SIZES_MIB.items():
        img = tmp_path / "disks" / f"{tier}.img"
        assert img.stat().st_size == size * 1024 * 1024 and img.stat().st_blocks == 0, "not sparse"
    saved = load("t1")
    assert [r["device"] for r in saved.resources if r["kind"] == "loop"] == ["/dev/loop7", "/dev/loop8", "/dev/loop9"]

    hv = inventory.render(state)["all"]["children"]["gpu_nodes"]["hosts"]["lab-1"]
    hv = {k: v for k, v in hv.items() if k in ("ansible_host",) or k.startswith("storage_tiers_")}  # + security
    assert hv == {"ansible_host": "10.77.1.11", "storage_tiers_hot_devices": ["/dev/loop7"],
                  "storage_tiers_warm_devices": ["/dev/loop8"], "storage_tiers_cold_devices": ["/dev/loop9"]}
    assert all(disks.attached(r) for r in state.resources if r["kind"] == "loop")

    monkeypatch.setattr(instance, "check_root", lambda: None)
    assert instance.down("t1", log=lambda *_: None)
    assert ["losetup", "--detach", "/dev/loop9"] in calls and ["losetup", "--detach", "/dev/loop7"] in calls
    assert disks.backed_by(str(tmp_path / "disks" / "hot.img"), sys_block.path) == []
    assert not any((tmp_path / "disks").glob("*.img"))
    assert load("t1") is None


def test_no_free_loop_device_is_a_clear_error_and_what_was_made_is_recorded(sys_block, monkeypatch, tmp_path):
    calls: list[list[str]] = []
    monkeypatch.setattr(disks.system, "run", _fake_losetup(sys_block, ["/dev/loop0"], calls))
    state = State.new("t2")
    with pytest.raises(LabError) as e:
        disks.attach(state, _host(), tmp_path / "disks", log=lambda *_: None)
    assert "could not attach a loop device for the warm tier of lab-1" in e.value.message
    assert "cannot find an unused loop device" in e.value.message
    assert "losetup -d" in e.value.fix and "lab-down" in e.value.fix
    # the rollback of `up` removes exactly these: both files, the one attached device, the unattached record
    assert teardown.teardown(state, log=lambda *_: None) == []
    assert ["losetup", "--detach", "/dev/loop0"] in calls
    assert not any((tmp_path / "disks").glob("*.img"))


def test_a_device_that_stays_attached_keeps_its_record(sys_block, monkeypatch):
    sys_block.attach("/dev/loop2", "/s/cold.img")
    monkeypatch.setattr(disks.system, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.setattr(disks.system, "wait_gone", lambda pred, timeout: pred())
    res = {"kind": "loop", "host": "lab-1", "tier": "cold", "file": "/s/cold.img", "device": "/dev/loop2"}
    with pytest.raises(LabError, match="still attached to /s/cold.img"):
        disks.undo_loop(res)
    assert teardown.remaining([res]) == ["loop /dev/loop2 (/s/cold.img)"]


def test_a_reused_device_number_is_not_ours(sys_block):
    """After a controller reboot /dev/loop0 may back someone else's file: not attached, nothing to detach."""
    sys_block.attach("/dev/loop0", "/elsewhere/disk.img")
    res = {"kind": "loop", "host": "lab-1", "tier": "hot", "file": "/s/hot.img", "device": "/dev/loop0"}
    assert not disks.attached(res)
    assert teardown.remaining([res]) == []
    disks.undo_loop(res)  # no losetup call: system.run is not faked and would fail on this machine without root


def test_loops_of_a_lost_state_are_foreign(sys_block, tmp_path):
    sys_block.attach("/dev/loop1", str(tmp_path / "state" / "x" / "hosts" / "lab-1" / "disks" / "hot.img"))
    sys_block.attach("/dev/loop2", str(tmp_path / "state" / "xy" / "hot.img"))
    assert disks.attached_under(tmp_path / "state" / "x", sys_block.path) == [
        f"/dev/loop1 ({tmp_path}/state/x/hosts/lab-1/disks/hot.img)"]


def test_kernel_without_loop_devices(tmp_path):
    with pytest.raises(LabError, match="no loop devices") as e:
        disks.check_loop_support(tmp_path / "loop-control")
    assert "modprobe loop" in e.value.fix


def test_missing_losetup_names_its_package():
    with pytest.raises(LabError, match=r"losetup \(package mount\)"):
        config.check_tools(which=lambda cmd: None if cmd == "losetup" else "/usr/bin/x")


def test_failed_up_detaches_loops_after_stopping_the_host(monkeypatch):
    """Recorded order: files and loop devices before the host process, so the rollback stops the container
    (its mounts go) before it detaches the devices and deletes the files."""
    undone: list[str] = []
    for kind in list(teardown.UNDO):
        monkeypatch.setitem(teardown.UNDO, kind, lambda res: undone.append(res["kind"]))
    monkeypatch.setattr(instance, "preflight", lambda *a: None)
    monkeypatch.setattr(instance, "foreign_objects", lambda *a: [])

    def create(state, n, apt_port, log):
        Path(state.state_dir).mkdir(parents=True)
        state.record("path", path=state.state_dir)
        state.record("path", path=state.state_dir + "/hot.img")
        state.record("loop", host="lab-1", tier="hot", file=state.state_dir + "/hot.img", device="/dev/loop0")
        state.record("process", role="host lab-1", pid=1, start=0)
        raise LabError("boom")

    monkeypatch.setattr(instance, "_create", create)
    with pytest.raises(LabError):
        instance.up("t3", 1, log=lambda *_: None)
    assert undone == ["process", "loop", "path", "path"]
