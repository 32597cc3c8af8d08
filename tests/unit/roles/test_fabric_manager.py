"""roles/fabric_manager on this machine (no GPU, no NVSwitch), run for real in check mode: auto skips with a
message, true (an inventory that calls this an HGX/DGX host) fails before any change naming the variable,
and the NVSwitch scan reads PCI class 0x0680 only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from role_check import check_role


def _run(tmp_path: Path, extra: dict) -> tuple[int, str]:
    return check_role(tmp_path, "fabric_manager", {"nvidia_driver_branch": "580", **extra})


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
