"""What roles/monitoring does: node_exporter on every host, dcgm-exporter on GPU hosts, Prometheus and
Alertmanager on the monitoring hosts with the repository's monitoring/ rules loaded and the runtime
scraped."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"


@pytest.fixture
def mon(host, rendered_settings) -> dict:
    return rendered_settings("monitoring")


@pytest.fixture
def server(mon) -> dict:
    if "monitoring" not in mon["group_names"]:
        pytest.skip("not a monitoring host (group monitoring)")
    return mon


def test_node_exporter_everywhere(host, mon):
    service = host.service("prometheus-node-exporter")
    assert service.is_enabled and service.is_running
    metrics = host.check_output("curl -fsS http://127.0.0.1:%s/metrics", str(mon["monitoring_node_exporter_port"]))
    assert "node_cpu_seconds_total" in metrics


def test_dcgm_exporter_on_gpu_hosts(host, mon, gpu_host):
    service = host.service("dcgm-exporter")
    assert service.is_enabled and service.is_running
    metrics = host.check_output("curl -fsS http://127.0.0.1:%s/metrics", str(mon["monitoring_dcgm_exporter_port"]))
    assert "DCGM_FI_DEV_GPU_UTIL" in metrics


def test_prometheus_and_alertmanager_running(host, server):
    for name in ("prometheus", "prometheus-alertmanager"):
        assert host.service(name).is_enabled and host.service(name).is_running, name
    assert host.run("promtool check config /etc/prometheus/prometheus.yml").rc == 0
    assert host.run("amtool check-config /etc/prometheus/alertmanager.yml").rc == 0


def test_rules_are_the_repository_files(host, server):
    for path in sorted((MONITORING / "rules").glob("*.yml")):
        deployed = host.file(f"/etc/prometheus/rules/{path.name}")
        assert deployed.is_file, path.name
        assert deployed.sha256sum == hashlib.sha256(path.read_bytes()).hexdigest(), path.name


def api(host, server, path: str) -> dict:
    return json.loads(
        host.check_output("curl -fsS 'http://127.0.0.1:%s%s'", str(server["monitoring_prometheus_port"]), path)
    )


def _repository_alerts() -> set[str]:
    docs = [yaml.safe_load(p.read_text()) for p in sorted((MONITORING / "rules").glob("*.yml"))]
    return {r["alert"] for doc in docs for g in doc["groups"] for r in g["rules"] if "alert" in r}


def test_prometheus_loaded_every_alert(host, server):
    groups = api(host, server, "/api/v1/rules")["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    expected = _repository_alerts()
    assert len(expected) >= 15 and loaded == expected, (sorted(expected - loaded), sorted(loaded - expected))


def test_prometheus_scrapes_runtime_and_exporters(host, server):
    targets = api(host, server, "/api/v1/targets?state=active")["data"]["activeTargets"]
    jobs: dict[str, set[str]] = {}
    for t in targets:
        jobs.setdefault(t["labels"]["job"], set()).add(t["labels"]["instance"])
    assert jobs.get("deepfleet") == set(server["groups"][server["monitoring_runtime_group"]]), jobs
    assert jobs.get("node") == set(server["groups"]["all"]), jobs
