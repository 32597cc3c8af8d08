"""Monitoring on Kubernetes, from the same files the Ansible monitoring role uses (`monitoring/`): the
PrometheusRule carries monitoring/rules/*.yml, the Grafana dashboard ConfigMap carries
monitoring/dashboards/deepfleet.json. Also: kube-prometheus-stack, dcgm-exporter, the ServiceMonitor for the
runtime, and prometheus-adapter with the rules that serve the HPA's Pods metrics.

HPA latency metric: prometheus-adapter turns the runtime's histogram `deepseek_inference_latency_seconds` into
the Pods metric `inference_latency_seconds` as the *mean* over 2 minutes (rate of _sum / rate of _count), not
as P99. The HPA averages the per-pod values and compares them with 80 ms: a per-pod P99 from a short window
rests on a handful of requests and jumps between bucket bounds, so replicas would flap; the mean is exact,
smooth and rises with queueing delay. P99 stays the SLO signal of the alerts (recording rule p99_5m)."""

from __future__ import annotations

import json

import pulumi
import pulumi_kubernetes as k8s
import yaml

from infra import helm
from infra.config import ROOT
from infra.gpu_catalog import GPU_NODE_AFFINITY, GPU_TOLERATION

NAMESPACE = "monitoring"
MONITORING_DIR = ROOT / "monitoring"
RULE_FILES = ("rules/recording.yml", "rules/alerts.yml")
DASHBOARD_FILE = "dashboards/deepfleet.json"
DCGM_FIELDS_FILE = "dcgm-fields.csv"  # the fields dcgm-exporter collects (also the Ansible role's list)
DCGM_FIELDS_MOUNT = "/etc/dcgm-exporter/deepfleet"
DASHBOARD_LABEL = "grafana_dashboard"  # what the Grafana sidecar of kube-prometheus-stack watches

# Pods metrics the HPA reads (names as prometheus-adapter serves them).
LATENCY_METRIC = "inference_latency_seconds"
QUEUE_METRIC = "inference_queue_length"
GPU_UTIL_METRIC = "gpu_utilization"
ADAPTER_WINDOW = "2m"

PROMETHEUS_URL = "http://kube-prometheus-stack-prometheus.monitoring.svc"

_POD = {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
# dcgm-exporter labels GPU series with the pod using the GPU; scraped through its ServiceMonitor (honorLabels
# off) those labels arrive as exported_namespace/exported_pod.
_GPU_POD = {"exported_namespace": {"resource": "namespace"}, "exported_pod": {"resource": "pod"}}


def adapter_rules() -> list[dict]:
    """prometheus-adapter `rules.custom`: runtime and GPU series → the HPA's Pods metrics."""
    w = ADAPTER_WINDOW
    return [
        {
            "seriesQuery": 'deepseek_inference_latency_seconds_sum{namespace!="",pod!=""}',
            "resources": {"overrides": _POD},
            "name": {"matches": "^deepseek_inference_latency_seconds_sum$", "as": LATENCY_METRIC},
            # Mean latency; clamp_min keeps an idle pod at 0 instead of NaN.
            "metricsQuery": (
                f"sum(rate(deepseek_inference_latency_seconds_sum{{<<.LabelMatchers>>}}[{w}])) by (<<.GroupBy>>)"
                f" / clamp_min(sum(rate(deepseek_inference_latency_seconds_count{{<<.LabelMatchers>>}}[{w}]))"
                " by (<<.GroupBy>>), 1e-9)"
            ),
        },
        {
            "seriesQuery": 'deepseek_inference_queue_length{namespace!="",pod!=""}',
            "resources": {"overrides": _POD},
            "name": {"matches": "^deepseek_inference_queue_length$", "as": QUEUE_METRIC},
            "metricsQuery": "max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
        },
        {
            "seriesQuery": 'DCGM_FI_DEV_GPU_UTIL{exported_namespace!="",exported_pod!=""}',
            "resources": {"overrides": _GPU_POD},
            "name": {"matches": "^DCGM_FI_DEV_GPU_UTIL$", "as": GPU_UTIL_METRIC},
            "metricsQuery": f"avg(avg_over_time(<<.Series>>{{<<.LabelMatchers>>}}[{w}])) by (<<.GroupBy>>)",
        },
    ]


def dcgm_exporter_values() -> dict:
    """dcgm-exporter only on GPU nodes (the GPU taint is tolerated, the affinity keeps it off CPU nodes), with
    the repository's DCGM field list."""
    return {
        "tolerations": [GPU_TOLERATION],
        "affinity": GPU_NODE_AFFINITY,
        "arguments": ["-f", f"{DCGM_FIELDS_MOUNT}/{DCGM_FIELDS_FILE}"],
        "extraConfigMapVolumes": [{"name": "deepfleet-dcgm-fields", "configMap": {"name": "deepfleet-dcgm-fields"}}],
        "extraVolumeMounts": [{"name": "deepfleet-dcgm-fields", "mountPath": DCGM_FIELDS_MOUNT, "readOnly": True}],
        "serviceMonitor": {"enabled": True, "honorLabels": False},
    }


def rule_groups() -> list[dict]:
    """Recording rules first (the alerts read their series), as the PrometheusRule's spec.groups."""
    return [g for f in RULE_FILES for g in yaml.safe_load((MONITORING_DIR / f).read_text())["groups"]]


def dashboard_json() -> str:
    """The dashboard file as-is; parsed once so a broken file fails here rather than in Grafana."""
    text = (MONITORING_DIR / DASHBOARD_FILE).read_text()
    json.loads(text)
    return text


class Monitoring(pulumi.ComponentResource):
    def __init__(
        self,
        name: str,
        workload_namespace: str,
        workload_selector: dict[str, str],
        provider: k8s.Provider,
        scrape_endpoint: dict,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("deepfleet:k8s:Monitoring", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        ns = k8s.core.v1.Namespace(f"{name}-ns", metadata={"name": NAMESPACE}, opts=child)
        in_ns = pulumi.ResourceOptions(parent=self, provider=provider, depends_on=[ns])
        stack = helm.release(
            f"{name}-prometheus",
            helm.PROMETHEUS_STACK,
            NAMESPACE,
            {
                "prometheus": {
                    "prometheusSpec": {
                        # Pick up ServiceMonitors/PrometheusRules from every namespace, not only this chart's.
                        "serviceMonitorSelectorNilUsesHelmValues": False,
                        "ruleSelectorNilUsesHelmValues": False,
                    }
                },
                "grafana": {
                    "sidecar": {"dashboards": {"enabled": True, "label": DASHBOARD_LABEL, "searchNamespace": "ALL"}}
                },
            },
            in_ns,
        )
        after_crds = pulumi.ResourceOptions(parent=self, provider=provider, depends_on=[stack])
        helm.release(
            f"{name}-adapter",
            helm.PROMETHEUS_ADAPTER,
            NAMESPACE,
            {
                "prometheus": {"url": PROMETHEUS_URL, "port": 9090},
                "rules": {"default": False, "custom": adapter_rules()},
            },
            after_crds,
        )
        fields = k8s.core.v1.ConfigMap(
            f"{name}-dcgm-fields",
            metadata={"name": "deepfleet-dcgm-fields", "namespace": NAMESPACE},
            data={DCGM_FIELDS_FILE: (MONITORING_DIR / DCGM_FIELDS_FILE).read_text()},
            opts=in_ns,
        )
        helm.release(
            f"{name}-dcgm",
            helm.DCGM_EXPORTER,
            NAMESPACE,
            dcgm_exporter_values(),
            pulumi.ResourceOptions(parent=self, provider=provider, depends_on=[stack, fields]),
        )
        k8s.apiextensions.CustomResource(
            f"{name}-servicemonitor",
            api_version="monitoring.coreos.com/v1",
            kind="ServiceMonitor",
            metadata={"name": "deepfleet", "namespace": workload_namespace, "labels": workload_selector},
            spec={
                "selector": {"matchLabels": workload_selector},
                "namespaceSelector": {"matchNames": [workload_namespace]},
                # infra/k8s_security.scrape_endpoint: https with the TLS Secret's CA when the runtime serves TLS
                "endpoints": [scrape_endpoint],
            },
            opts=after_crds,
        )
        k8s.apiextensions.CustomResource(
            f"{name}-rules",
            api_version="monitoring.coreos.com/v1",
            kind="PrometheusRule",
            metadata={"name": "deepfleet", "namespace": NAMESPACE},
            spec={"groups": rule_groups()},
            opts=after_crds,
        )
        k8s.core.v1.ConfigMap(
            f"{name}-dashboard",
            metadata={"name": "deepfleet-dashboard", "namespace": NAMESPACE, "labels": {DASHBOARD_LABEL: "1"}},
            data={"deepfleet.json": dashboard_json()},
            opts=in_ns,
        )
        self.register_outputs({})
