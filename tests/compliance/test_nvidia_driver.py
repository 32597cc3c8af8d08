"""What roles/nvidia_driver does: nouveau blacklisted, module options, driver branch pinned in apt; on GPU
hosts the pinned branch is the one loaded, nouveau is not, and nvidia-persistenced runs."""

from __future__ import annotations

import pytest


@pytest.fixture
def drv(role_settings) -> dict:
    return role_settings("nvidia_driver")


def test_nouveau_blacklisted(host):
    f = host.file("/etc/modprobe.d/blacklist-nouveau.conf")
    assert f.is_file and f.user == "root" and f.mode == 0o644
    lines = f.content_string.splitlines()
    assert "blacklist nouveau" in lines and "options nouveau modeset=0" in lines


def test_module_options(host, drv):
    text = host.file("/etc/modprobe.d/nvidia-deepfleet.conf").content_string
    for name, value in drv["nvidia_driver_module_params"].items():
        assert f"{name}={value}" in text.split(), name
    if drv["nvidia_driver_module_params"]:
        assert "options nvidia " in text


def test_driver_branch_pinned(host, drv):
    text = host.file("/etc/apt/preferences.d/deepfleet-nvidia-driver").content_string
    assert f"Pin: version {drv['nvidia_driver_branch']}.*" in text.splitlines()
    assert "Pin-Priority: 1001" in text.splitlines()
    # apt itself reads the pin (a syntax error would be ignored by apt with a warning)
    assert "deepfleet-nvidia-driver" not in host.run("apt-cache policy 2>&1 >/dev/null").stdout


def test_gpu_loaded_driver_is_the_pinned_branch(host, drv, gpu_host):
    branch = drv["nvidia_driver_branch"]
    assert not host.file("/sys/module/nouveau").exists, "nouveau is loaded"
    module = host.file("/sys/module/nvidia/version")
    if module.exists:  # sandboxed kernels (gVisor) show no /sys/module/nvidia: nvidia-smi below still answers
        assert module.content_string.strip().startswith(branch + ".")
    versions = host.check_output("nvidia-smi --query-gpu=driver_version --format=csv,noheader").split()
    assert len(versions) == gpu_host and all(v.startswith(branch + ".") for v in versions)


def test_gpu_persistence_mode(host, drv, gpu_host):
    if not drv["nvidia_driver_persistence"]:
        pytest.skip("nvidia_driver_persistence is false")
    if not drv["nvidia_driver_preinstalled"]:  # an image's driver keeps persistence with nvidia-smi -pm instead
        svc = host.service("nvidia-persistenced")
        assert svc.is_enabled and svc.is_running
    modes = host.check_output("nvidia-smi --query-gpu=persistence_mode --format=csv,noheader").split()
    assert modes == ["Enabled"] * gpu_host
