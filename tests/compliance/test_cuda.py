"""What roles/cuda does: the CUDA environment (file + login shells) with TORCH_CUDA_ARCH_LIST derived from the
declared or detected GPUs; on GPU hosts the pinned CUDA release, cuDNN and the dynamic linker entry."""

from __future__ import annotations

import pytest

# Written down from NVIDIA's CUDA GPU list (compute capability per product and PCI device id), not from the
# role's plugin: the role's derivation is what is being checked.
GENERATION_CC = {"v100": "7.0", "t4": "7.5", "a100": "8.0", "a30": "8.0", "a10": "8.6", "a40": "8.6",
                 "orin": "8.7", "rtx4090": "8.9", "l4": "8.9", "l40s": "8.9", "h100": "9.0", "h200": "9.0",
                 "b200": "10.0", "rtx5090": "12.0"}
PCI_ID_CC = {
    "0x1db4": "7.0", "0x1db5": "7.0", "0x1db6": "7.0",  # V100 PCIe/SXM2 16/32 GB
    "0x1eb8": "7.5",  # T4
    "0x20b0": "8.0", "0x20b2": "8.0", "0x20b5": "8.0", "0x20f1": "8.0", "0x20b7": "8.0",  # A100 40/80 GB, A30
    "0x2236": "8.6", "0x2235": "8.6",  # A10, A40
    "0x2684": "8.9", "0x27b8": "8.9", "0x26b9": "8.9", "0x26b5": "8.9",  # RTX 4090, L4, L40S, L40
    "0x2330": "9.0", "0x2331": "9.0", "0x2324": "9.0", "0x2335": "9.0", "0x2342": "9.0",  # H100, H800, H200, GH200
    "0x2901": "10.0",  # B200
    "0x2b85": "12.0",  # RTX 5090
}


def _expected_arch_list(generations: list[str], device_ids: list[str], fallback: list[str]) -> str:
    if generations:
        archs = {GENERATION_CC[g.lower()] for g in generations}
    elif device_ids:
        unknown = sorted(set(device_ids) - set(PCI_ID_CC))
        if unknown:
            pytest.fail(f"PCI device id(s) {unknown} are not in this test's table: add their compute capability")
        archs = {PCI_ID_CC[d] for d in device_ids}
    else:
        archs = set(fallback)
    return ";".join(sorted(archs, key=lambda a: tuple(int(x) for x in a.split("."))))


@pytest.fixture
def cuda(role_settings) -> dict:
    return role_settings("cuda")


def _env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_cuda_environment_file(host, cuda, gpu_device_ids):
    env = _env(host.file("/etc/deepfleet/cuda.env").content_string)
    assert env["CUDA_HOME"] == f"/usr/local/cuda-{cuda['cuda_version']}"
    expected = _expected_arch_list(cuda["cuda_gpu_generations"], gpu_device_ids, cuda["cuda_fallback_arch_list"])
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


def test_gpu_compute_capability_from_the_pci_id(host, gpu_device_ids, gpu_host):
    """The compute capability the driver reports is the one the PCI device id stands for."""
    rows = host.check_output("nvidia-smi --query-gpu=pci.device_id,compute_cap --format=csv,noheader").splitlines()
    assert len(rows) == gpu_host
    for row in rows:
        pci, cc = (field.strip() for field in row.split(","))
        device_id = "0x" + pci[2:6].lower()  # "0x233510DE": device id, then the vendor id 10DE
        assert device_id in gpu_device_ids
        assert PCI_ID_CC.get(device_id) == cc, f"{device_id}: driver says {cc}"
