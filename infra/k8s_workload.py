"""The Kubernetes inference workload. Provider-agnostic: runs on EKS (weights from FSx, staged onto NVMe) and
on any kubeconfig, e.g. an on-prem cluster (weights already on the host's NVMe, staged by Ansible)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from deepfleet.defaults import API_PORT, SHUTDOWN_GRACE_S
from infra import monitoring
from infra.config import Autoscaling, Model, Networks, Workload
from infra.gpu_catalog import EFA_RESOURCE, GPU_RESOURCE, GPU_TOLERATION
from infra.k8s_security import pod_security, port_name, probe_scheme
from infra.runtime_settings import serve_settings, set_flags
from infra.storage import FSX_MOUNT, WeightFlow

APP = "deepfleet"  # Deployment, Service, ServiceAccount name; the Prometheus job label the alerts select
LABELS = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "inference"}
RUN_AS = 10001


@dataclass(frozen=True)
class FsxVolume:
    """The FSx file system behind the weight flow, as a static CSI PersistentVolume."""

    flow: WeightFlow
    capacity_gib: int


def resources(w: Workload, efa_interfaces: int = 0) -> dict:
    """`efa_interfaces`: EFA devices each pod takes (its pools' interfaces; 0 where the pools have no EFA)."""
    r = w.resources
    # Extended resources (GPUs, EFA) must have request == limit.
    extended = {GPU_RESOURCE: str(r.gpus)} | ({EFA_RESOURCE: str(efa_interfaces)} if efa_interfaces else {})
    return {
        "requests": {**extended, "cpu": str(r.cpu_request), "memory": f"{r.memory_request_gib}Gi"},
        "limits": {**extended, "cpu": str(r.cpu_limit), "memory": f"{r.memory_limit_gib}Gi"},
    }


def hpa_spec(a: Autoscaling) -> dict:
    """autoscaling/v2: Pods metrics served by prometheus-adapter (rules in monitoring.adapter_rules)."""

    def pods(metric: str, target: str) -> dict:
        return {
            "type": "Pods",
            "pods": {"metric": {"name": metric}, "target": {"type": "AverageValue", "averageValue": target}},
        }

    return {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
        "minReplicas": a.min_replicas,
        "maxReplicas": a.max_replicas,
        "metrics": [
            pods(monitoring.LATENCY_METRIC, f"{a.latency_target_ms}m"),  # 80 ms = 80m seconds
            pods(monitoring.QUEUE_METRIC, str(a.queue_length_target)),
            pods(monitoring.GPU_UTIL_METRIC, str(a.gpu_utilization_target_percent)),
        ],
        "behavior": {
            # Scale out fast on latency; scale in only after the cooldown, one replica per minute.
            "scaleUp": {
                "stabilizationWindowSeconds": 0,
                "selectPolicy": "Max",
                "policies": [
                    {"type": "Percent", "value": 100, "periodSeconds": 30},
                    {"type": "Pods", "value": 2, "periodSeconds": 30},
                ],
            },
            "scaleDown": {
                "stabilizationWindowSeconds": a.scale_down_cooldown_s,
                "selectPolicy": "Min",
                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
            },
        },
    }


def pod_spec(
    w: Workload, model: Model, node_label: tuple[str, str] | None, fsx_path: str | None, efa_interfaces: int = 0
) -> dict:
    """`fsx_path`: where the weights are on FSx (EKS); None means they are already on the host (on-prem)."""
    security = pod_security(w.security, model.local_path)  # Secrets mounted read-only, settings that use them
    port, scheme = port_name(w.security), probe_scheme(w.security)

    def get(path: str) -> dict:
        return {"path": path, "port": port, "scheme": scheme}

    probe = {"httpGet": get("/readyz"), "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "runtime",
        "image": w.image,
        "command": [
            "deepfleet",
            "serve",
            model.local_path,
            "--host",
            "0.0.0.0",
            "--port",
            str(API_PORT),
            # one engine over every GPU the pod requests (one worker process each), so none sits idle
            "--tensor-parallel-size",
            str(w.resources.gpus),
            *set_flags(serve_settings(model)),
            *set_flags(security.settings),
        ],
        "ports": [{"name": port, "containerPort": API_PORT, "protocol": "TCP"}],
        "resources": resources(w, efa_interfaces),
        # Loading weights takes minutes: the startup probe holds liveness off for up to 20 min.
        "startupProbe": {"httpGet": get("/healthz"), "periodSeconds": 10, "failureThreshold": 120},
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": get("/healthz"), "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "weights", "mountPath": model.local_path, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},  # NCCL between the pod's GPUs needs shared memory
            {"name": "tmp", "mountPath": "/tmp"},
            *security.mounts,
        ],
    }
    volumes: list[dict] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        {"name": "tmp", "emptyDir": {}},
        *security.volumes,
    ]
    init: list[dict] = []
    if fsx_path:
        # FSx (hot) → NVMe (warm): emptyDir lives on the instance-store RAID0 (nodeadm localStorage).
        volumes += [
            {"name": "weights", "emptyDir": {}},
            {"name": "fsx", "persistentVolumeClaim": {"claimName": "deepfleet-models-fsx", "readOnly": True}},
        ]
        init.append(
            {
                "name": "stage-weights",
                "image": w.image,
                "command": ["cp", "-a", f"{FSX_MOUNT}{fsx_path}/.", model.local_path],
                "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}},
                "securityContext": _container_security(),
                "volumeMounts": [
                    {"name": "fsx", "mountPath": FSX_MOUNT, "readOnly": True},
                    {"name": "weights", "mountPath": model.local_path},
                ],
            }
        )
    else:
        # On-prem: Ansible staged the weights on the host's NVMe at the same path.
        volumes.append({"name": "weights", "hostPath": {"path": model.local_path, "type": "Directory"}})
    spec: dict = {
        "serviceAccountName": APP,
        "automountServiceAccountToken": False,
        # Longer than the runtime's drain period, so in-flight requests finish before SIGKILL.
        "terminationGracePeriodSeconds": SHUTDOWN_GRACE_S + 30,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "tolerations": [GPU_TOLERATION],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": LABELS},
            }
            for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
        ],
        "initContainers": init,
        "containers": [container],
        "volumes": volumes,
    }
    if node_label:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": node_label[0], "operator": "In", "values": [node_label[1]]}]}
                    ]
                }
            }
        }
    return spec


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


class InferenceWorkload(pulumi.ComponentResource):
    def __init__(
        self,
        name: str,
        workload: Workload,
        autoscaling: Autoscaling,
        model: Model,
        networks: Networks,
        provider: k8s.Provider,
        fsx: FsxVolume | None = None,
        node_label: tuple[str, str] | None = None,
        efa_interfaces: int = 0,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("deepfleet:k8s:InferenceWorkload", name, None, opts)
        ns = workload.namespace
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        # PSA: restricted where weights come through a PVC; on-prem's hostPath needs the privileged level,
        # so there restricted only warns.
        enforce = "restricted" if fsx else "privileged"
        self.namespace = k8s.core.v1.Namespace(
            name,
            metadata={
                "name": ns,
                "labels": {
                    "pod-security.kubernetes.io/enforce": enforce,
                    "pod-security.kubernetes.io/warn": "restricted",
                },
            },
            opts=child,
        )
        child = pulumi.ResourceOptions(parent=self, provider=provider, depends_on=[self.namespace])
        meta = {"namespace": ns, "labels": LABELS}
        k8s.core.v1.ServiceAccount(
            f"{name}-sa", metadata={**meta, "name": APP}, automount_service_account_token=False, opts=child
        )
        if fsx:
            self._fsx_claim(name, ns, fsx, child)
        self.deployment = k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata={**meta, "name": APP},
            spec={
                "replicas": autoscaling.min_replicas,
                "selector": {"matchLabels": LABELS},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": LABELS},
                    "spec": pod_spec(
                        workload, model, node_label, fsx.flow.fsx_path if fsx else None, efa_interfaces
                    ),
                },
            },
            # The HPA owns the replica count after creation.
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(ignore_changes=["spec.replicas"])),
        )
        k8s.policy.v1.PodDisruptionBudget(
            f"{name}-pdb",
            metadata={**meta, "name": APP},
            spec={"maxUnavailable": 1, "selector": {"matchLabels": LABELS}},
            opts=child,
        )
        self.service = k8s.core.v1.Service(
            f"{name}-service",
            metadata={**meta, "name": APP},
            spec={
                "type": "ClusterIP",
                "selector": LABELS,
                "ports": [{"name": port_name(workload.security), "port": API_PORT,
                           "targetPort": port_name(workload.security), "protocol": "TCP",
                           "appProtocol": "https" if workload.security.tls_secret else "http"}],
            },
            opts=child,
        )
        k8s.networking.v1.NetworkPolicy(
            f"{name}-netpol",
            metadata={**meta, "name": APP},
            spec={
                "podSelector": {"matchLabels": LABELS},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {
                        "from": [
                            {"podSelector": {}},  # the router in this namespace
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": monitoring.NAMESPACE}
                                }
                            },
                            *({"ipBlock": {"cidr": cidr}} for cidr in networks.allowed),
                        ],
                        "ports": [{"protocol": "TCP", "port": API_PORT}],
                    }
                ],
                "egress": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                            }
                        ],
                        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                    }
                ],
            },
            opts=child,
        )
        self.hpa = k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{name}-hpa",
            metadata={**meta, "name": APP},
            spec=hpa_spec(autoscaling),
            opts=child,
        )
        self.register_outputs({"service": self.service.metadata.name})

    def _fsx_claim(self, name: str, ns: str, fsx: FsxVolume, opts: pulumi.ResourceOptions) -> None:
        size = f"{fsx.capacity_gib}Gi"
        pv = k8s.core.v1.PersistentVolume(
            f"{name}-fsx-pv",
            metadata={"name": "deepfleet-models-fsx", "labels": LABELS},
            spec={
                "capacity": {"storage": size},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "persistentVolumeReclaimPolicy": "Retain",
                "mountOptions": ["flock"],
                "csi": {
                    "driver": "fsx.csi.aws.com",
                    "volumeHandle": fsx.flow.fsx_file_system_id,
                    "readOnly": True,
                    "volumeAttributes": {"dnsname": fsx.flow.fsx_dns_name, "mountname": fsx.flow.fsx_mount_name},
                },
            },
            opts=opts,
        )
        k8s.core.v1.PersistentVolumeClaim(
            f"{name}-fsx-pvc",
            metadata={"name": "deepfleet-models-fsx", "namespace": ns, "labels": LABELS},
            spec={
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": pv.metadata.name,
                "resources": {"requests": {"storage": size}},
            },
            opts=opts,
        )
