"""On-prem Kubernetes: NVIDIA's device plugin with GPU feature discovery advertises nvidia.com/gpu (and labels
the nodes dcgm-exporter selects), or, as an option, the GPU Operator without its own driver and toolkit (the
Ansible roles provide both)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
from infra_capture import k8s_manifests

from infra import helm
from infra.config import ConfigError, parse, read_stack_file
from infra.mocks import Capture, run

RELEASE = "kubernetes:helm.sh/v3:Release"


def _releases(capture: Capture) -> dict[str, dict]:
    return {r.inputs["name"]: r.inputs for r in capture.of_type(RELEASE)}


def test_onprem_cluster_gets_the_device_plugin_with_feature_discovery(onprem_stack: Capture) -> None:
    plugin = _releases(onprem_stack)["nvidia-device-plugin"]
    assert (plugin["chart"], plugin["version"]) == (helm.NVIDIA_DEVICE_PLUGIN.chart, helm.NVIDIA_DEVICE_PLUGIN.version)
    assert plugin["namespace"] == "kube-system"
    assert plugin["values"]["gfd"] == {"enabled": True}
    assert plugin["values"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "gpu-operator" not in _releases(onprem_stack)


def test_gpu_operator_option_leaves_driver_toolkit_and_exporter_to_the_repository() -> None:
    raw = copy.deepcopy(read_stack_file("onprem"))
    raw["workload"]["gpu_stack"] = "gpu_operator"
    capture = run("onprem", raw)
    (ns,) = [m for m in k8s_manifests(capture) if m["kind"] == "Namespace" and m["metadata"]["name"] == "gpu-operator"]
    kubernetes_validate.validate(ns, "1.31", strict=True)
    releases = _releases(capture)
    assert "nvidia-device-plugin" not in releases
    operator = releases["gpu-operator"]
    assert operator["namespace"] == "gpu-operator"
    values = operator["values"]
    assert values["driver"] == {"enabled": False} and values["toolkit"] == {"enabled": False}
    assert values["dcgmExporter"] == {"enabled": False}


def test_device_plugin_advertises_whole_gpus_unless_mig_single_is_declared(onprem_stack: Capture) -> None:
    plugin = _releases(onprem_stack)["nvidia-device-plugin"]
    assert plugin["values"]["config"] == {"map": {"default": "version: v1\nflags:\n  migStrategy: none\n"}}
    raw = copy.deepcopy(read_stack_file("onprem"))
    raw["workload"]["mig_strategy"] = "single"
    raw["workload"]["resources"]["gpus"] = 1
    plugin = _releases(run("onprem", raw))["nvidia-device-plugin"]
    assert plugin["values"]["config"] == {"map": {"default": "version: v1\nflags:\n  migStrategy: single\n"}}
    raw["workload"]["gpu_stack"] = "gpu_operator"
    operator = _releases(run("onprem", raw))["gpu-operator"]["values"]
    assert operator["mig"] == {"strategy": "single"}
    assert operator["migManager"] == {"enabled": False}  # roles/nvidia_mig partitions the hosts


def test_mig_single_with_tensor_parallel_pods_is_refused() -> None:
    raw = copy.deepcopy(read_stack_file("onprem"))
    raw["workload"]["mig_strategy"] = "single"
    raw["workload"]["resources"]["gpus"] = 2
    with pytest.raises(ConfigError, match=r"resources.gpus: 2 with mig_strategy single: a pod gets one MIG device"):
        parse(raw)


def test_mig_strategy_on_eks_is_refused() -> None:
    raw = copy.deepcopy(read_stack_file("aws"))
    raw["workload"]["mig_strategy"] = "single"
    raw["workload"]["resources"]["gpus"] = 1
    with pytest.raises(ConfigError, match=r"workload.mig_strategy: EKS GPU nodes are not MIG-partitioned"):
        parse(raw)
