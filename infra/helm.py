"""Helm releases of third-party charts, pinned. Bump a version deliberately, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s


@dataclass(frozen=True)
class Chart:
    release: str
    repo: str
    chart: str
    version: str
    app_version: str = ""  # where the image must match something of ours (cluster-autoscaler: Kubernetes minor)


NVIDIA_DEVICE_PLUGIN = Chart(
    "nvidia-device-plugin", "https://nvidia.github.io/k8s-device-plugin", "nvidia-device-plugin", "0.17.1"
)
GPU_OPERATOR = Chart("gpu-operator", "https://helm.ngc.nvidia.com/nvidia", "gpu-operator", "v25.3.0")
EFA_DEVICE_PLUGIN = Chart(
    "aws-efa-k8s-device-plugin", "https://aws.github.io/eks-charts", "aws-efa-k8s-device-plugin", "v0.5.6"
)
FSX_CSI_DRIVER = Chart(
    "aws-fsx-csi-driver", "https://kubernetes-sigs.github.io/aws-fsx-csi-driver", "aws-fsx-csi-driver", "1.11.0"
)
PROMETHEUS_STACK = Chart(
    "kube-prometheus-stack", "https://prometheus-community.github.io/helm-charts", "kube-prometheus-stack", "66.3.1"
)
PROMETHEUS_ADAPTER = Chart(
    "prometheus-adapter", "https://prometheus-community.github.io/helm-charts", "prometheus-adapter", "4.11.0"
)
# appVersion 1.31.0: cluster-autoscaler simulates the scheduler of its own Kubernetes minor (aws.kubernetes_version).
CLUSTER_AUTOSCALER = Chart(
    "cluster-autoscaler", "https://kubernetes.github.io/autoscaler", "cluster-autoscaler", "9.38.0", "1.31.0"
)
DCGM_EXPORTER = Chart("dcgm-exporter", "https://nvidia.github.io/dcgm-exporter/helm-charts", "dcgm-exporter", "3.6.1")


def release(name: str, chart: Chart, namespace: str, values: dict, opts: pulumi.ResourceOptions) -> k8s.helm.v3.Release:
    # atomic: a failed install/upgrade rolls back instead of leaving a half-applied release.
    return k8s.helm.v3.Release(
        name,
        name=chart.release,
        chart=chart.chart,
        version=chart.version,
        namespace=namespace,
        repository_opts={"repo": chart.repo},
        values=values,
        atomic=True,
        opts=opts,
    )
