"""What advertises GPUs to the scheduler on an on-prem Kubernetes cluster (EKS gets its device plugin in
infra/eks.py). Either NVIDIA's device plugin with GPU feature discovery, which labels GPU nodes
`nvidia.com/gpu.present=true` (dcgm-exporter's affinity reads it), or the GPU Operator. The hosts' driver and
container toolkit are the Ansible roles' (nvidia_driver, container_runtime): the operator must not install its own."""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from infra import helm
from infra.gpu_catalog import GPU_TOLERATION, device_plugin_config

NAMESPACE = "kube-system"
OPERATOR_NAMESPACE = "gpu-operator"


def device_plugin_values(mig_strategy: str) -> dict:
    return {
        "tolerations": [GPU_TOLERATION],
        "gfd": {"enabled": True},  # also deploys node-feature-discovery, which gfd's labels need
        "config": device_plugin_config(mig_strategy),
    }


def gpu_operator_values(mig_strategy: str) -> dict:
    return {
        "driver": {"enabled": False},  # roles/nvidia_driver
        "toolkit": {"enabled": False},  # roles/container_runtime
        "dcgmExporter": {"enabled": False},  # infra/monitoring.py deploys it with the repository's fields
        "mig": {"strategy": mig_strategy},
        "migManager": {"enabled": False},  # roles/nvidia_mig partitions the GPUs (nvidia_mig_layout)
        "daemonsets": {"tolerations": [GPU_TOLERATION]},
    }


class OnpremGpuStack(pulumi.ComponentResource):
    def __init__(self, name: str, gpu_stack: str, mig_strategy: str, provider: k8s.Provider,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__("deepfleet:k8s:OnpremGpuStack", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        if gpu_stack == "gpu_operator":
            ns = k8s.core.v1.Namespace(f"{name}-ns", metadata={"name": OPERATOR_NAMESPACE}, opts=child)
            helm.release(f"{name}-operator", helm.GPU_OPERATOR, OPERATOR_NAMESPACE, gpu_operator_values(mig_strategy),
                         pulumi.ResourceOptions(parent=self, provider=provider, depends_on=[ns]))
        else:
            values = device_plugin_values(mig_strategy)
            helm.release(f"{name}-device-plugin", helm.NVIDIA_DEVICE_PLUGIN, NAMESPACE, values, child)
        self.register_outputs({})
