"""The shell probes the GPU roles and the compliance suite share, run on fake toolkit trees and a fake
nvidia-smi: roles/cuda/files/cuda-release.sh and roles/nvidia_driver/files/gpu-scan.sh."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROLES = Path(__file__).resolve().parents[3] / "roles"
CUDA_RELEASE = ROLES / "cuda" / "files" / "cuda-release.sh"
GPU_SCAN = ROLES / "nvidia_driver" / "files" / "gpu-scan.sh"


def _run(script: Path, *args: str, path: str = "/usr/bin:/bin") -> str:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, check=True,
                          env={"PATH": path}, timeout=30).stdout.strip()


def _exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{text}\n")
    path.chmod(0o755)


def test_cuda_release_from_version_json_txt_or_nvcc(tmp_path):
    json_home, txt_home, nvcc_home = tmp_path / "cuda-12.8", tmp_path / "cuda-10.2", tmp_path / "cuda-13.0"
    json_home.mkdir()
    (json_home / "version.json").write_text(json.dumps({"cuda": {"name": "CUDA SDK", "version": "12.8.1"},
                                                        "cuda_cudart": {"version": "12.8.90"}}))
    txt_home.mkdir()
    (txt_home / "version.txt").write_text("CUDA Version 10.2.89\n")
    # the H200 device image: CUDA 13.0 with bin/nvcc but no version.json
    _exe(nvcc_home / "bin" / "nvcc", 'echo "Cuda compilation tools, release 13.0, V13.0.88"')
    assert _run(CUDA_RELEASE, str(json_home)) == "12.8.1"
    assert _run(CUDA_RELEASE, str(txt_home)) == "10.2.89"
    assert _run(CUDA_RELEASE, str(nvcc_home)) == "13.0.88"
    assert _run(CUDA_RELEASE, str(tmp_path / "missing"), str(json_home)) == "12.8.1"  # first that exists
    assert _run(CUDA_RELEASE, str(tmp_path / "missing")) == ""  # no toolkit


def _nvidia_on_pci() -> bool:
    return any(p.read_text().strip() == "0x10de" for p in Path("/sys/bus/pci/devices").glob("*/vendor"))


@pytest.fixture
def no_gpu_on_pci():
    if _nvidia_on_pci():
        pytest.skip("this machine has an NVIDIA PCI function: the scan reads sysfs, not the fallback")


def test_gpu_scan_falls_back_to_nvidia_smi_without_a_pci_bus(tmp_path, no_gpu_on_pci):
    # Real nvidia-smi output format of the H200 device (pci.bus_id, pci.device_id = device + vendor id)
    _exe(tmp_path / "bin" / "nvidia-smi", 'echo "00000000:00:06.0, 0x233510DE"; echo "00000000:1B:00.0, 0x233510DE"')
    out = _run(GPU_SCAN, path=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert out.splitlines() == ["0000:00:06.0 0x2335", "0000:1b:00.0 0x2335"]


def test_gpu_scan_is_empty_without_gpu_or_driver(no_gpu_on_pci):
    assert _run(GPU_SCAN) == ""
