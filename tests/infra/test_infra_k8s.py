"""The Kubernetes side of every example stack: each captured manifest validates against Kubernetes 1.31
(strict), the CRDs against the shipped schemas; the workload, HPA and monitoring carry the right values."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from infra_capture import k8s_manifests, manifest
from prometheus_client import generate_latest

from deepfleet.server.metrics import LoadSnapshot, ServerMetrics
from infra import monitoring
from infra.config import ROOT
from infra.mocks import Capture

SCHEMAS = Path(__file__).parent / "crd_schemas"
CRD_SCHEMAS = {"ServiceMonitor": "servicemonitor.json", "PrometheusRule": "prometheusrule.json"}


def _one(capture: Capture, kind: str, name: str) -> dict:
    found = [m for m in k8s_manifests(capture) if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)}"
    return found[0]


def test_every_manifest_is_valid(any_stack: Capture) -> None:
    manifests = k8s_manifests(any_stack)
    assert len(manifests) >= 10
    for m in manifests:
        if m["kind"] in CRD_SCHEMAS:
            jsonschema.validate(m, json.loads((SCHEMAS / CRD_SCHEMAS[m["kind"]]).read_text()))
        else:
            kubernetes_validate.validate(m, "1.31", strict=True)


def test_strict_validation_catches_a_typo(aws_stack: Capture) -> None:
    deployment = _one(aws_stack, "Deployment", "deepfleet")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = broken["spec"]["template"]["spec"][
        "containers"
    ][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31", strict=True)


def test_hpa_scales_2_to_10_on_80ms_mean_latency(any_stack: Capture) -> None:
    hpa = _one(any_stack, "HorizontalPodAutoscaler", "deepfleet")
    spec = hpa["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "deepfleet"}
    metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in spec["metrics"]}
    assert metrics["inference_latency_seconds"] == {"type": "AverageValue", "averageValue": "80m"}
    assert metrics["inference_queue_length"]["averageValue"] == "50"
    assert metrics["gpu_utilization"]["averageValue"] == "85"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_adapter_rules_serve_every_hpa_metric_from_series_the_runtime_exports(aws_stack: Capture) -> None:
    release = next(
        r.inputs for r in aws_stack.of_type("kubernetes:helm.sh/v3:Release") if r.inputs["name"] == "prometheus-adapter"
    )
    rules = release["values"]["rules"]["custom"]
    served = {r["name"]["as"]: r for r in rules}
    hpa = _one(aws_stack, "HorizontalPodAutoscaler", "deepfleet")
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} == set(served)
    latency = served["inference_latency_seconds"]["metricsQuery"]
    assert "deepseek_inference_latency_seconds_sum" in latency and "deepseek_inference_latency_seconds_count" in latency
    # The runtime's /metrics really has the series the runtime rules select.
    snapshot = LoadSnapshot(**{f: 0 for f in LoadSnapshot.__dataclass_fields__} | {"ready": True})
    metrics = ServerMetrics(lambda: snapshot)
    metrics.request_done("/v1/chat/completions", 200, 0.05)
    exposition = generate_latest(metrics.registry).decode()
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        if not series.startswith("DCGM_"):  # GPU series come from dcgm-exporter
            assert f"\n{series}" in exposition, series


def test_workload_requests_gpus_probes_and_spreads(aws_stack: Capture) -> None:
    pod = _one(aws_stack, "Deployment", "deepfleet")["spec"]["template"]["spec"]
    runtime = next(c for c in pod["containers"] if c["name"] == "runtime")
    # Pulumi.aws.yaml: both pools have EFA (p4d.24xlarge 4 interfaces, p5.48xlarge 32): each pod takes 4
    assert runtime["resources"] == {
        "requests": {"nvidia.com/gpu": "4", "vpc.amazonaws.com/efa": "4", "cpu": "16", "memory": "128Gi"},
        "limits": {"nvidia.com/gpu": "4", "vpc.amazonaws.com/efa": "4", "cpu": "32", "memory": "256Gi"},
    }
    assert runtime["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert runtime["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert runtime["ports"] == [{"name": "https", "containerPort": 8000, "protocol": "TCP"}]  # TLS in aws
    assert "queue_full_status=503" in runtime["command"]
    tp = runtime["command"].index("--tensor-parallel-size")
    assert runtime["command"][tp + 1] == "4"  # the engine spans the 4 GPUs the pod requests
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    # S3 → FSx → NVMe: the init container copies from the FSx claim into the NVMe-backed emptyDir.
    (stage,) = pod["initContainers"]
    assert stage["command"] == [
        "cp",
        "-a",
        "/fsx/models/deepseek-r1-distill-qwen-32b/.",
        "/models/deepseek-r1-distill-qwen-32b",
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["fsx"]["persistentVolumeClaim"]["claimName"] == "deepfleet-models-fsx"
    assert volumes["weights"] == {"name": "weights", "emptyDir": {}}
    pv = _one(aws_stack, "PersistentVolume", "deepfleet-models-fsx")
    assert pv["spec"]["csi"]["driver"] == "fsx.csi.aws.com"
    pdb = _one(aws_stack, "PodDisruptionBudget", "deepfleet")
    assert pdb["spec"]["maxUnavailable"] == 1
    netpol = _one(aws_stack, "NetworkPolicy", "deepfleet")
    assert netpol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in netpol["spec"]["ingress"][0]["from"]


def test_onprem_workload_reads_weights_from_the_host(onprem_stack: Capture) -> None:
    pod = _one(onprem_stack, "Deployment", "deepfleet")["spec"]["template"]["spec"]
    assert "initContainers" not in pod or not pod["initContainers"]
    weights = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert weights["hostPath"]["path"] == "/models/deepseek-r1-distill-qwen-32b"
    ns = _one(onprem_stack, "Namespace", "deepfleet")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert not onprem_stack.of_type("aws:eks/cluster:Cluster")
    provider = onprem_stack.one("pulumi:providers:kubernetes", "deepfleet-k8s")
    assert provider.inputs["context"] == "onprem-dgx"


def test_prometheus_rule_and_dashboard_come_from_monitoring_dir(any_stack: Capture) -> None:
    rule = _one(any_stack, "PrometheusRule", "deepfleet")
    expected = [
        g
        for f in ("recording.yml", "alerts.yml")
        for g in yaml.safe_load((ROOT / "monitoring/rules" / f).read_text())["groups"]
    ]
    assert rule["spec"]["groups"] == expected
    dashboard = _one(any_stack, "ConfigMap", "deepfleet-dashboard")
    assert dashboard["metadata"]["labels"] == {monitoring.DASHBOARD_LABEL: "1"}
    assert json.loads(dashboard["data"]["deepfleet.json"]) == json.loads(
        (ROOT / "monitoring/dashboards/deepfleet.json").read_text()
    )
    sm = _one(any_stack, "ServiceMonitor", "deepfleet")
    (endpoint,) = sm["spec"]["endpoints"]
    assert {k: endpoint[k] for k in ("path", "interval")} == {"path": "/metrics", "interval": "15s"}
    assert endpoint["port"] in ("http", "https")  # https where the stack serves TLS (test_infra_k8s_security)
    # Prometheus names the job after the Service: the alerts select job="deepfleet".
    service = _one(any_stack, "Service", "deepfleet")
    alerts = (ROOT / "monitoring/rules/alerts.yml").read_text()
    assert 'job="deepfleet"' in alerts and service["metadata"]["name"] == "deepfleet"


def test_manifest_helper_fills_api_version_and_kind(aws_stack: Capture) -> None:
    ns = aws_stack.one("kubernetes:core/v1:Namespace", "deepfleet")
    assert manifest(ns)["apiVersion"] == "v1" and manifest(ns)["kind"] == "Namespace"


def test_crd_schemas_reject_typos(aws_stack: Capture) -> None:
    sm = json.loads(json.dumps(_one(aws_stack, "ServiceMonitor", "deepfleet")))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    rule = json.loads(json.dumps(_one(aws_stack, "PrometheusRule", "deepfleet")))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    for m in (sm, rule):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(m, json.loads((SCHEMAS / CRD_SCHEMAS[m["kind"]]).read_text()))


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _restricted_violations(pod: dict) -> list[str]:
    """The Pod Security Standard `restricted` checks the API server would enforce on these pods."""
    out = [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    pod_sc = pod.get("securityContext", {})
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            out.append(f"{c['name']}: capabilities")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if (sc.get("seccompProfile") or pod_sc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            out.append(f"{c['name']}: seccompProfile")
    return out


def test_pods_in_restricted_namespaces_meet_the_restricted_standard(any_stack: Capture) -> None:
    manifests = k8s_manifests(any_stack)
    restricted = {
        m["metadata"]["name"]
        for m in manifests
        if m["kind"] == "Namespace"
        and m["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted"
    }
    pods = [m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["namespace"] in restricted]
    assert pods or any_stack.stack == "onprem"  # on-prem mounts host weights: privileged, restricted only warns
    for m in pods:
        assert _restricted_violations(m["spec"]["template"]["spec"]) == [], m["metadata"]["name"]
    hostpath = {"name": "w", "hostPath": {"path": "/models"}}
    assert _restricted_violations({"volumes": [hostpath], "containers": []}) == ["volume w"]


def test_dcgm_exporter_runs_on_gpu_nodes_only_with_the_repository_fields(any_stack: Capture) -> None:
    (release,) = [r.inputs for r in any_stack.of_type("kubernetes:helm.sh/v3:Release")
                  if r.inputs["name"] == "dcgm-exporter"]
    values = release["values"]
    terms = values["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    # EKS GPU node groups' label, or the label gpu-feature-discovery puts on on-prem GPU nodes
    assert {(t["matchExpressions"][0]["key"], tuple(t["matchExpressions"][0]["values"])) for t in terms} == {
        ("deepfleet.io/accelerator", ("nvidia",)), ("nvidia.com/gpu.present", ("true",))}
    assert values["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    fields = _one(any_stack, "ConfigMap", "deepfleet-dcgm-fields")["data"]["dcgm-fields.csv"]
    assert fields == (ROOT / "monitoring" / "dcgm-fields.csv").read_text()
    assert values["arguments"] == ["-f", "/etc/dcgm-exporter/deepfleet/dcgm-fields.csv"]
    (mount,) = values["extraVolumeMounts"]
    assert mount["mountPath"] == "/etc/dcgm-exporter/deepfleet"
