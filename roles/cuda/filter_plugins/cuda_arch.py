"""Pure logic of the cuda role, importable by pytest: GPU generation -> compute capability, the
TORCH_CUDA_ARCH_LIST a host gets, and the driver branch a CUDA release needs."""

# Declared generation names (inventory) -> compute capability. Orin is a Jetson SoC (not on PCI).
GENERATION_ARCH = {
    "v100": "7.0",
    "t4": "7.5",
    "a100": "8.0",
    "a30": "8.0",
    "a10": "8.6",
    "a40": "8.6",
    "orin": "8.7",
    "rtx4090": "8.9",
    "l4": "8.9",
    "l40s": "8.9",
    "h100": "9.0",
    "h200": "9.0",
    "b200": "10.0",
    "rtx5090": "12.0",
}

# PCI device-id ranges of NVIDIA chip families (inclusive) -> compute capability. The first match wins:
# GH100 ids lie inside the GA10x span, so it comes first.
DEVICE_ID_RANGES = [
    (0x1DB0, 0x1DBF, "7.0"),  # GV100: V100
    (0x1E00, 0x1FFF, "7.5"),  # TU10x: T4, RTX 20
    (0x20B0, 0x20FF, "8.0"),  # GA100: A100, A30
    (0x2300, 0x23FF, "9.0"),  # GH100: H100, H200, H800, H20, GH200
    (0x2200, 0x25FF, "8.6"),  # GA10x: A10, A40, RTX 30
    (0x2680, 0x28FF, "8.9"),  # AD10x: RTX 4090, L4, L40(S)
    (0x2900, 0x29FF, "10.0"),  # GB100: B200
    (0x2B00, 0x2FFF, "12.0"),  # GB20x: RTX 50
]


def _arch_key(arch: str) -> tuple[int, int]:
    major, minor = arch.split(".")
    return int(major), int(minor)


def device_id_arch(device_id: str) -> str | None:
    """Compute capability of a PCI device id like '0x2330', or None for an unknown chip."""
    value = int(device_id, 16)
    for low, high, arch in DEVICE_ID_RANGES:
        if low <= value <= high:
            return arch
    return None


def cuda_arch_list(generations, device_ids, fallback):
    """TORCH_CUDA_ARCH_LIST: declared generations win; else the detected GPUs; else the fallback list.
    Unknown generation names raise (a typo must not silently build for the wrong GPU)."""
    if generations:
        unknown = [g for g in generations if str(g).lower() not in GENERATION_ARCH]
        if unknown:
            raise ValueError(
                f"cuda_gpu_generations: unknown generation(s) {unknown}; known: {sorted(GENERATION_ARCH)}"
            )
        archs = {GENERATION_ARCH[str(g).lower()] for g in generations}
    else:
        archs = {a for a in (device_id_arch(d) for d in device_ids or []) if a}
        if not archs:
            archs = set(fallback)
    return ";".join(sorted(archs, key=_arch_key))


def cuda_archs_supported(arch_list: str, max_arch: str, min_arch: str = "0.0") -> bool:
    """True when every arch of 'X.Y;...' lies between the oldest and the newest arch the CUDA release
    compiles for."""
    return all(_arch_key(min_arch) <= _arch_key(a) <= _arch_key(max_arch) for a in arch_list.split(";") if a)


def cuda_driver_ok(driver_branch, min_driver) -> bool:
    """A CUDA release runs on driver branches >= its minimum branch."""
    if not str(driver_branch).isdigit():
        raise ValueError(f"nvidia_driver_branch (cuda_driver_branch): {driver_branch!r} is not a driver branch number")
    return int(driver_branch) >= int(min_driver)


class FilterModule:
    def filters(self):
        return {
            "cuda_arch_list": cuda_arch_list,
            "cuda_archs_supported": cuda_archs_supported,
            "cuda_driver_ok": cuda_driver_ok,
        }
