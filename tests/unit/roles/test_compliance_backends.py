"""The compliance suite runs through testinfra's local:// backend too (this machine, no GPU): role values
come from an inventory file when one is given (--ansible-inventory + --inventory-host), the roles' defaults
otherwise, and --require-gpu turns the GPU checks' skip into a failure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
GPU_CHECKS = "tests/compliance/test_nvidia_driver.py::test_gpu_persistence_mode"


def _pytest(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsf", GPU_CHECKS,
                          "--hosts=local://", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    return res.stdout + res.stderr


def test_gpu_check_skips_on_local_without_gpu_and_without_inventory():
    out = _pytest()
    assert "1 skipped" in out and "no NVIDIA GPU on this host" in out, out


def test_require_gpu_flag_fails_the_gpu_check():
    out = _pytest("--require-gpu")
    assert re.search(r"1 (failed|error)", out) and "--require-gpu is given but the host has no NVIDIA GPU" in out, out


def test_inventory_values_reach_local_backend(tmp_path):
    inventory = {"all": {"children": {"gpu_nodes": {"hosts": {"dgx-01": {"nvidia_driver_gpu_required": True}}}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    out = _pytest(f"--ansible-inventory={tmp_path / 'hosts.yml'}", "--inventory-host=dgx-01")
    assert re.search(r"1 (failed|error)", out) and "nvidia_driver_gpu_required is true" in out, out
