"""roles/fabric_manager on this machine (no GPU, no NVSwitch), run for real in check mode: auto skips with a
message, true (an inventory that calls this an HGX/DGX host) fails before any change naming the variable,
and the NVSwitch scan reads PCI class 0x0680 only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def _run(tmp_path: Path, extra: dict) -> tuple[int, str]:
    play = [{"name": "fabric manager", "hosts": "localhost", "gather_facts": False,
             "tasks": [{"ansible.builtin.include_role": {"name": "fabric_manager"}}]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    (tmp_path / "vars.yml").write_text(yaml.safe_dump({"nvidia_driver_branch": "580", **extra}))
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(REPO / "roles"), ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{BIN}:{env['PATH']}"
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", "--check",
                          "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"@{tmp_path / 'vars.yml'}",
                          str(tmp_path / "play.yml")], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=180)
    return res.returncode, " ".join((res.stdout + res.stderr).split())


def _has_nvswitch() -> bool:
    return any(
        (d / "vendor").read_text().strip() == "0x10de" and (d / "class").read_text().startswith("0x0680")
        for d in Path("/sys/bus/pci/devices").glob("*") if (d / "vendor").exists()
    )


@pytest.fixture
def no_nvswitch():
    if _has_nvswitch():
        pytest.skip("this machine has NVSwitches")


def test_auto_skips_without_nvswitch(tmp_path, no_nvswitch):
    rc, out = _run(tmp_path, {})
    assert rc == 0, out
    assert "no NVSwitch on the PCI bus (fabric_manager_enabled=auto): Fabric Manager is not needed" in out
    assert re.search(r"localhost : ok=\d+ changed=0 unreachable=0 failed=0", out), out


@pytest.mark.parametrize("value", [True, "true"])
def test_required_on_a_host_without_nvswitch_fails_naming_the_variable(tmp_path, no_nvswitch, value):
    rc, out = _run(tmp_path, {"fabric_manager_enabled": value})
    assert rc != 0
    assert "fabric_manager_enabled is true for localhost but no NVSwitch (PCI vendor 0x10de, class 0x0680)" in out
    assert re.search(r"localhost : ok=\d+ changed=0 unreachable=0 failed=1", out), out


def test_bad_value_names_the_variable(tmp_path):
    rc, out = _run(tmp_path, {"fabric_manager_enabled": "sometimes"})
    assert rc != 0 and "fabric_manager_enabled=sometimes: auto, true or false" in out, out
