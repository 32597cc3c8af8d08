"""What roles/container_runtime does: a working container engine, the deepfleet.slice limits and the run
arguments (--cpus, --memory, GPUs); on GPU hosts the NVIDIA Container Toolkit's CDI specification."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROLE_VARS = Path(__file__).resolve().parents[2] / "roles" / "container_runtime" / "vars" / "main.yml"


@pytest.fixture
def cr(role_settings) -> dict:
    return role_settings("container_runtime")


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", str(size))
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def test_engine_works(host, cr):
    engine = cr["container_runtime_engine"]
    if engine == "docker":
        assert host.service("docker").is_running
    out = host.run(f"{engine} info")
    assert out.rc == 0, out.stderr


def test_storage_driver_fits_the_filesystem(host, cr):
    if cr["container_runtime_engine"] != "podman":
        pytest.skip("podman-specific")
    fs = host.check_output("findmnt --noheadings --output FSTYPE --target /var/lib/containers")
    driver = host.check_output("podman info --format '{{.Store.GraphDriverName}}'")
    assert driver == ("vfs" if fs == "overlay" else "overlay")


def test_deepfleet_slice_limits(host, cr):
    limits = cr["container_runtime_limits"]
    props = dict(line.split("=", 1) for line in host.check_output(
        "systemctl show deepfleet.slice -p MemoryMax -p CPUQuotaPerSecUSec").splitlines())
    assert int(props["MemoryMax"]) == _bytes(limits["memory"])
    assert props["CPUQuotaPerSecUSec"] == f"{int(float(limits['cpus']))}s"


def test_container_run_arguments(host, cr, gpu_device_ids):
    env = host.file("/etc/deepfleet/container.env").content_string
    args = re.search(r'^DEEPFLEET_CONTAINER_ARGS="(.*)"$', env, re.M).group(1).split()
    limits = cr["container_runtime_limits"]
    assert f"--cpus={limits['cpus']}" in args and f"--memory={limits['memory']}" in args
    assert "--cgroup-parent=deepfleet.slice" in args
    for name, value in cr["container_runtime_ulimits"].items():
        assert f"{name}={value}" in args
    gpu_arg = "nvidia.com/gpu=" if cr["container_runtime_engine"] == "podman" else "--gpus"
    assert (gpu_arg in " ".join(args)) == bool(gpu_device_ids)


def test_podman_defaults(host, cr):
    if cr["container_runtime_engine"] != "podman":
        pytest.skip("podman-specific")
    conf = host.file("/etc/containers/containers.conf.d/50-deepfleet.conf").content_string
    for name, value in cr["container_runtime_ulimits"].items():
        assert f'"{name}={value}"' in conf
    # podman reads the drop-in (and finds it valid)
    debug = host.run("podman --log-level=debug info")
    assert "50-deepfleet.conf" in debug.stderr and debug.rc == 0


def test_gpu_cdi_spec(host, gpu_host):
    assert host.file("/etc/cdi/nvidia.yaml").is_file
    devices = host.check_output("nvidia-ctk cdi list")
    assert "nvidia.com/gpu=all" in devices
    assert sum(1 for d in devices.splitlines() if re.fullmatch(r"nvidia\.com/gpu=\d+", d.strip())) == gpu_host


def test_gpu_smoke_line_pattern_counts_the_gpus_of_real_nvidia_smi(host, gpu_host):
    """The pattern the CDI smoke test counts GPUs with, applied to this host's own `nvidia-smi -L`."""
    pattern = yaml.safe_load(ROLE_VARS.read_text())["container_runtime_smoke_gpu_line"]
    lines = host.check_output("nvidia-smi -L").splitlines()
    assert sum(1 for line in lines if re.match(pattern, line)) == gpu_host, lines
