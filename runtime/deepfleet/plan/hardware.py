"""GPUs the planner sizes for: memory as the driver reports it (nvidia-smi MiB; Jetson: the unified memory the
module shares with its CPU), the most that one host carries, and how they are linked. Vendor datasheet figures."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_bytes: int
    max_per_host: int
    link: str
    unified: bool = False  # Jetson: GPU and CPU share one memory; the OS and the server take part of it

    def as_dict(self) -> dict:
        return dict(self.__dict__)


GPUS: tuple[GPU, ...] = (
    GPU("a100-40gb", "A100 SXM 40GB", 40_960 * MIB, 8, "NVLink 600 GB/s"),
    GPU("a100-80gb", "A100 SXM 80GB", 81_920 * MIB, 8, "NVLink 600 GB/s"),
    GPU("h100-80gb", "H100 SXM 80GB", 81_559 * MIB, 8, "NVLink 900 GB/s (NVSwitch)"),
    GPU("h200", "H200 SXM 141GB", 143_771 * MIB, 8, "NVLink 900 GB/s (NVSwitch)"),
    GPU("l40s", "L40S 48GB", 46_068 * MIB, 8, "PCIe 4.0"),
    GPU("t4", "T4 16GB", 15_360 * MIB, 8, "PCIe 3.0"),
    GPU("rtx4090", "RTX 4090 24GB", 24_564 * MIB, 4, "PCIe 4.0 (no NVLink)"),
    GPU("orin-16gb", "Jetson Orin NX 16GB", 16 * 1024 * MIB, 1, "-", unified=True),
    GPU("orin-32gb", "Jetson AGX Orin 32GB", 32 * 1024 * MIB, 1, "-", unified=True),
    GPU("orin-64gb", "Jetson AGX Orin 64GB", 64 * 1024 * MIB, 1, "-", unified=True),
)
# Jetson: memory the OS, the server process and the CUDA runtime keep out of the GPU's share (estimate)
UNIFIED_HOST_RESERVE_BYTES = 3 * 1024 * MIB


def gpu(key: str) -> GPU:
    for g in GPUS:
        if g.key == key:
            return g
    raise ValueError(f"gpu: {key!r} is not in the hardware table (choose {', '.join(g.key for g in GPUS)})")
