"""GPU hardware facts, defined once: AWS instance types and the GPU models found on-prem and at the edge.

The config validator rejects anything not listed here, the launch templates take their EFA interface count
from here, and the on-prem group_vars take `cuda_gpu_generations` (the cuda role's names) from here."""

from dataclasses import dataclass

# The extended resource the NVIDIA device plugin advertises; GPU nodes are tainted with it so only pods that
# tolerate it (GPU workloads, device plugins, dcgm-exporter) land there.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


def device_plugin_config(mig_strategy: str) -> dict:
    """NVIDIA device plugin (and GPU feature discovery) config: how MIG devices are advertised. none: whole
    GPUs; single: every GPU of a node split alike (roles/nvidia_mig), each MIG device one nvidia.com/gpu."""
    return {"map": {"default": f"version: v1\nflags:\n  migStrategy: {mig_strategy}\n"}}


# The extended resource the AWS EFA device plugin advertises (one per EFA interface of the node).
EFA_RESOURCE = "vpc.amazonaws.com/efa"
# GPU nodes: EKS node groups carry ACCELERATOR_LABEL (infra/eks.py); on-prem nodes carry the label NVIDIA's
# GPU feature discovery (device plugin / GPU Operator) sets.
ACCELERATOR_LABEL = "deepfleet.io/accelerator"  # "nvidia" on every EKS GPU node
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"  # "true", set by gpu-feature-discovery
GPU_NODE_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            # terms are ORed: either label marks a GPU node
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": ACCELERATOR_LABEL, "operator": "In", "values": ["nvidia"]}]},
                {"matchExpressions": [{"key": GPU_PRESENT_LABEL, "operator": "In", "values": ["true"]}]},
            ]
        }
    }
}


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_gib: int
    generation: str  # the cuda role's generation name (roles/cuda/filter_plugins/cuda_arch.py)


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu: GpuModel
    gpus: int
    vcpus: int
    memory_gib: int
    efa_interfaces: int  # 0 = no EFA
    nvme_gib: int  # local instance-store NVMe (the warm weight cache)

    @property
    def efa_capable(self) -> bool:
        return self.efa_interfaces > 0


A100_40 = GpuModel("A100-SXM4-40GB", 40, "a100")
A100_80 = GpuModel("A100-SXM4-80GB", 80, "a100")
H100_80 = GpuModel("H100-SXM5-80GB", 80, "h100")
A10G = GpuModel("A10G", 24, "a10")
T4 = GpuModel("T4", 16, "t4")
RTX_4090 = GpuModel("RTX-4090", 24, "rtx4090")
ORIN_64 = GpuModel("Jetson-AGX-Orin-64GB", 64, "orin")
ORIN_32 = GpuModel("Jetson-AGX-Orin-32GB", 32, "orin")
ORIN_NX_16 = GpuModel("Jetson-Orin-NX-16GB", 16, "orin")

GPU_MODELS: dict[str, GpuModel] = {m.name: m for m in (A100_40, A100_80, H100_80, A10G, T4, RTX_4090)}
# Jetson memory is shared between CPU and GPU: the edge profile sizes the small model against it.
EDGE_DEVICES: dict[str, GpuModel] = {
    "jetson-agx-orin-64gb": ORIN_64,
    "jetson-agx-orin-32gb": ORIN_32,
    "jetson-orin-nx-16gb": ORIN_NX_16,
}

# EFA interface counts: p4d/p4de expose 4 EFA-capable network cards, p5.48xlarge 32 (AWS EC2 docs).
INSTANCE_TYPES: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("p4d.24xlarge", A100_40, 8, 96, 1152, 4, 8000),
        InstanceType("p4de.24xlarge", A100_80, 8, 96, 1152, 4, 8000),
        InstanceType("p5.48xlarge", H100_80, 8, 192, 2048, 32, 30400),
        InstanceType("g5.48xlarge", A10G, 8, 192, 768, 1, 7600),
        InstanceType("g5.12xlarge", A10G, 4, 48, 192, 1, 3800),
        InstanceType("g5.2xlarge", A10G, 1, 8, 32, 0, 450),
        InstanceType("g4dn.12xlarge", T4, 4, 48, 192, 1, 900),
        InstanceType("g4dn.xlarge", T4, 1, 4, 16, 0, 125),
    )
}
