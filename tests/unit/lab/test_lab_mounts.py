"""Mount points are read from the mount table: `ip netns add` bind-mounts /run/netns onto itself, and where /run
is on the root file system (no tmpfs) os.path.ismount cannot see that mount, so teardown would rmdir a busy mount
point (EBUSY) and leave the lab's state behind. Needs root (as `make test` does) for a real bind mount."""

from __future__ import annotations

import os
import subprocess

from lab import system, teardown


def test_a_bind_mount_within_one_file_system_is_a_mount(tmp_path):
    point = tmp_path / "netns"
    point.mkdir()
    subprocess.run(["mount", "--bind", str(point), str(point)], check=True)
    try:
        assert system.is_mount(point)
        assert not os.path.ismount(point)  # the reason for is_mount: same device above and below
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert not system.is_mount(point)


def test_run_netns_mount_undo_unmounts_a_same_fs_bind_mount_and_removes_the_dir(tmp_path):
    point = tmp_path / "netns"
    point.mkdir()
    subprocess.run(["mount", "--bind", str(point), str(point)], check=True)
    try:
        teardown.undo_run_netns_mount({"path": str(point), "created_dir": True})
        assert not system.is_mount(point) and not point.exists()
    finally:
        if system.is_mount(point):
            subprocess.run(["umount", str(point)], check=False)
