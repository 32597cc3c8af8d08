"""What roles/cuda does: the CUDA environment (file + login shells) with TORCH_CUDA_ARCH_LIST derived from the
declared or detected GPUs; on GPU hosts the pinned CUDA release, cuDNN and the dynamic linker entry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[2] / "roles" / "cuda" / "filter_plugins" / "cuda_arch.py"


def _cuda_arch_list(*args):
    spec = importlib.util.spec_from_file_location("compliance_cuda_arch", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cuda_arch_list(*args)


@pytest.fixture
def cuda(role_settings) -> dict:
    return role_settings("cuda")


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_cuda_environment_file(host, cuda, gpu_device_ids):
    env = _env(host.file("/etc/deepfleet/cuda.env").content_string)
    assert env["CUDA_HOME"] == f"/usr/local/cuda-{cuda['cuda_version']}"
    expected = _cuda_arch_list(cuda["cuda_gpu_generations"], gpu_device_ids, cuda["cuda_fallback_arch_list"])
    assert env["TORCH_CUDA_ARCH_LIST"] == expected


def test_login_shells_get_the_cuda_environment(host, cuda):
    out = host.check_output("bash -lc 'echo $CUDA_HOME $TORCH_CUDA_ARCH_LIST; echo $PATH'").splitlines()
    home, archs = out[0].split()
    assert home == f"/usr/local/cuda-{cuda['cuda_version']}" and archs
    assert f"{home}/bin" in out[1].split(":")


def test_gpu_cuda_release_and_cudnn(host, cuda, gpu_host):
    version = cuda["cuda_version"]
    if cuda["cuda_install_toolkit"]:
        assert f"release {version}" in host.check_output(f"/usr/local/cuda-{version}/bin/nvcc --version")
    libs = host.check_output("ldconfig -p")
    assert f"/usr/local/cuda-{version}/" in libs, "CUDA libraries not known to the dynamic linker"
    if cuda["cuda_matrix"][version]["cudnn"]:
        assert "libcudnn.so" in libs
