"""playbooks/gpu.yml rolls over the GPU hosts: a batch size of 0 is refused before any change, naming
gpu_upgrade_serial, and one failing host stops the roll (the next host is never touched). Run for real in
check mode against this machine under two inventory names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from role_check import REPO, check_playbook


def _play(tmp_path: Path, hosts: dict, *extra: str) -> tuple[int, str]:
    return check_playbook(tmp_path, REPO / "playbooks/gpu.yml", {"gpu_nodes": hosts}, *extra)


def test_serial_zero_is_refused_before_any_change(tmp_path):
    rc, out = _play(tmp_path, {"gpu-a": {}}, "-e", json.dumps({"gpu_upgrade_serial": 0}))
    flat = " ".join(out.split())
    assert rc != 0
    assert "gpu_upgrade_serial=0: hosts upgraded at a time must be at least 1" in flat, out
    assert re.search(r"gpu-a\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=1", out), out


def test_a_failing_host_stops_the_roll(tmp_path):
    # gpu-a's settings are wrong (CUDA 13.0 on driver 570): the roll stops there and gpu-b is never started
    rc, out = _play(tmp_path, {"gpu-a": {"nvidia_driver_branch": "570", "cuda_version": "13.0"}, "gpu-b": {}})
    assert rc != 0
    assert "cuda_version=13.0 needs" in " ".join(out.split()), out
    assert "ok: [gpu-b]" not in out and "changed: [gpu-b]" not in out, out
    assert re.search(r"gpu-a\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=1", out), out


def test_a_mig_layout_for_gpus_the_host_lacks_is_refused_before_any_change(tmp_path):
    layout = [{"devices": [0], "mig-enabled": True, "mig-devices": {"1g.18gb": 7}}]
    rc, out = _play(tmp_path, {"gpu-a": {"nvidia_mig_layout": layout}})
    flat = " ".join(out.split())
    assert rc != 0
    assert "gpu-a: nvidia_mig_layout[0].devices: GPU index [0] not on this host (no GPU detected)" in flat, out
    assert re.search(r"gpu-a\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=1", out), out
