"""Hybrid routing: the generated Envoy config has cloud/on-prem/edge clusters, on-prem first with cloud as
the next priority, least-request balancing, health checks, outlier detection, and a switchover bound."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import yaml

from deepfleet.defaults import API_PORT
from infra import hybrid_routing as hr
from infra.config import ConfigError, parse, read_stack_file
from infra.mocks import Capture

CLOUD = "deepfleet.deepfleet.svc.cluster.local"


def _config(switchover_ms: int = 100) -> dict:
    raw = copy.deepcopy(read_stack_file("hybrid"))
    raw["routing"]["switchover_ms"] = switchover_ms
    return hr.envoy_config(parse(raw), CLOUD)


def _clusters(config: dict) -> dict:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _routes(config: dict) -> list:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


def _type_urls(node) -> set[str]:
    if isinstance(node, dict):
        return {node.get("@type", "")} - {""} | {u for v in node.values() for u in _type_urls(v)}
    if isinstance(node, list):
        return {u for v in node for u in _type_urls(v)}
    return set()


def envoy_bootstrap(config: dict):
    """Parse the config against Envoy's v3 data-plane API (unknown fields are errors), typed configs included."""
    modules = ["envoy.config.bootstrap.v3"]
    modules += [url.removeprefix("type.googleapis.com/").rsplit(".", 1)[0] for url in _type_urls(config)]
    with warnings.catch_warnings():  # envoy_data_plane's generated code uses validators pydantic deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        bootstrap = [importlib.import_module(f"envoy_data_plane.{m}") for m in modules][0]
    return bootstrap.Bootstrap.from_dict(config)


def test_config_parses_against_the_envoy_v3_api() -> None:
    bootstrap = envoy_bootstrap(_config())
    hcm = bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.unpack()
    retry = hcm.route_config.virtual_hosts[0].routes[-1].route.retry_policy
    assert retry.retry_priority.typed_config.unpack().update_frequency == 1
    assert retry.retry_back_off.max_interval.total_seconds() == 0.025
    aggregate = bootstrap.static_resources.clusters[2].cluster_type.typed_config.unpack()
    assert list(aggregate.clusters) == ["onprem", "cloud"]
    onprem = bootstrap.static_resources.clusters[0]
    assert onprem.connect_timeout.total_seconds() == 0.05 and onprem.lb_policy.name == "LEAST_REQUEST"


def test_the_api_check_catches_a_typo() -> None:
    config = _config()
    config["static_resources"]["clusters"][0]["outlier_detection"]["consecutive_gateway_failures"] = 2
    with pytest.raises(KeyError, match="consecutive_gateway_failures"):
        envoy_bootstrap(config)


def test_sites_are_clusters_with_health_checks_and_outlier_detection() -> None:
    clusters = _clusters(_config())
    assert set(clusters) == {"onprem", "cloud", "edge", "hybrid"}
    endpoints = {
        name: [e["endpoint"]["address"]["socket_address"] for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]]
        for name, c in clusters.items()
        if name != "hybrid"
    }
    assert endpoints["onprem"] == [
        {"address": "10.20.0.11", "port_value": API_PORT},
        {"address": "10.20.0.12", "port_value": API_PORT},
    ]
    assert endpoints["cloud"] == [{"address": CLOUD, "port_value": API_PORT}]
    assert endpoints["edge"] == [{"address": "10.30.0.21", "port_value": API_PORT}]
    for name in ("onprem", "cloud", "edge"):
        c = clusters[name]
        assert c["lb_policy"] == "LEAST_REQUEST"
        assert c["health_checks"][0]["http_health_check"]["path"] == "/readyz"
        od = c["outlier_detection"]
        assert od["consecutive_local_origin_failure"] == 1 and od["consecutive_gateway_failure"] == 2
        assert od["max_ejection_percent"] == 100
    assert clusters["cloud"]["type"] == "STRICT_DNS" and clusters["onprem"]["type"] == "STATIC"


def test_onprem_serves_first_and_cloud_takes_retries_and_overflow() -> None:
    config = _config()
    aggregate = _clusters(config)["hybrid"]["cluster_type"]
    assert aggregate["name"] == "envoy.clusters.aggregate"
    assert aggregate["typed_config"]["clusters"] == ["onprem", "cloud"]  # priority order
    routes = _routes(config)
    assert routes[0]["route"]["cluster"] == "edge"
    assert routes[0]["match"]["headers"][0]["name"] == hr.EDGE_HEADER
    retry = routes[-1]["route"]["retry_policy"]
    assert routes[-1]["route"]["cluster"] == "hybrid"
    assert retry["retriable_status_codes"] == [503]  # saturated/draining runtime; never 429 (rate limit)
    assert "connect-failure" in retry["retry_on"] and "reset" in retry["retry_on"]
    assert retry["retry_priority"]["name"] == "envoy.retry_priorities.previous_priorities"


# Worked out by hand from the README's rule (connect timeout half the target, longest retry back-off a
# quarter): target -> (on-prem connect_timeout, retry max_interval, worst case = their sum in ms).
SWITCHOVER = {100: ("0.050s", "0.025s", 75), 40: ("0.020s", "0.010s", 30), 400: ("0.200s", "0.100s", 300)}


@pytest.mark.parametrize("target", sorted(SWITCHOVER))
def test_switchover_stays_within_the_target(target: int) -> None:
    connect_timeout, max_interval, worst_ms = SWITCHOVER[target]
    config = _config(target)
    retry = _routes(config)[-1]["route"]["retry_policy"]
    assert _clusters(config)["onprem"]["connect_timeout"] == connect_timeout
    assert retry["retry_back_off"]["max_interval"] == max_interval
    assert hr.switchover_budget_ms(config) == worst_ms <= target


def test_a_config_that_misses_the_target_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(
        hr, "timings", lambda ms: {"onprem_connect_timeout_ms": ms, "retry_base_ms": 10, "retry_max_ms": 50}
    )
    with pytest.raises(ConfigError, match="deepfleet:routing.switchover_ms: failover takes up to 150.0 ms"):
        _config(100)


def test_exported_and_deployed_config_match(hybrid_stack: Capture) -> None:
    exported = yaml.safe_load(hybrid_stack.outputs["envoy_config"])
    assert exported == _config()
    cm = hybrid_stack.one("kubernetes:core/v1:ConfigMap", "deepfleet-router-config").inputs
    assert yaml.safe_load(cm["data"]["envoy.yaml"]) == exported
    deployment = hybrid_stack.one("kubernetes:apps/v1:Deployment", "deepfleet-router-deployment").inputs
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == hr.ENVOY_IMAGE and container["args"] == ["--config-path", "/etc/envoy/envoy.yaml"]


def test_route_timeout_is_the_runtime_deadline() -> None:
    assert _routes(_config())[-1]["route"]["timeout"] == "600s"
