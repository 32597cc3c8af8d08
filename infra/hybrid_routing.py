"""Hybrid routing: a generated Envoy (v3) configuration with one cluster per site and priority failover.

- `onprem` (DGX hosts), `cloud` (the EKS Service), `edge` (Jetson devices, small model) clusters; least-request
  balancing (power of two choices on outstanding requests: a slow host accumulates requests and gets fewer new
  ones), active HTTP health checks on /readyz, outlier detection that ejects a host on its first connect
  failure or after consecutive gateway errors (timeouts, 502-504).
- `hybrid`: an aggregate cluster [onprem, cloud] — on-prem is priority 0 and serves first; as on-prem hosts turn
  unhealthy or get ejected, traffic moves to cloud.
- Bursts: a saturated runtime answers 503 (serve setting queue_full_status); the route retries it, connect
  failures and resets on the *next priority* (retry priority previous_priorities), so cloud absorbs overflow.
  Per-client 429s (rate limit) are not retried.
- Switchover: a request that hits a dead on-prem host costs at most the connect timeout plus one retry back-off
  before it runs on cloud; `switchover_budget_ms` computes that bound and the program refuses a config above
  `routing.switchover_ms`. Requests with header `x-deepfleet-route: edge` go to the edge cluster."""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s
import yaml

from deepfleet.defaults import API_PORT
from deepfleet.server.config import ServeSettings
from infra.config import ConfigError, StackConfig

ENVOY_IMAGE = "envoyproxy/envoy:v1.32.3"
EDGE_HEADER = "x-deepfleet-route"
# The runtime's own deadline: long generations must not be cut by the router first.
ROUTE_TIMEOUT_S = int(ServeSettings.model_fields["request_timeout_s"].default)
HEALTH_INTERVAL_MS = 1000
CLOUD_CONNECT_TIMEOUT_MS = 1000  # the last resort may take the WAN's time
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_AGGREGATE = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig"
_PREVIOUS_PRIORITIES = (
    "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
)


def _ms(ms: int) -> str:
    return f"{ms / 1000:.3f}s"


def timings(switchover_ms: int) -> dict[str, int]:
    """Failover timings derived from the switchover target (ms)."""
    return {
        "onprem_connect_timeout_ms": switchover_ms // 2,
        "retry_base_ms": max(switchover_ms // 10, 1),
        "retry_max_ms": switchover_ms // 4,
    }


def _cluster(name: str, endpoints: list[tuple[str, int]], connect_timeout_ms: int, dns: bool) -> dict:
    return {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": _ms(connect_timeout_ms),
        "lb_policy": "LEAST_REQUEST",
        "least_request_lb_config": {"choice_count": 2},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                        for host, port in endpoints
                    ]
                }
            ],
        },
        "health_checks": [
            {
                "timeout": _ms(HEALTH_INTERVAL_MS // 2),
                "interval": _ms(HEALTH_INTERVAL_MS),
                "unhealthy_threshold": 2,
                "healthy_threshold": 2,
                "http_health_check": {"path": "/readyz"},
            }
        ],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,  # refused/timed-out connect: eject at once
            "consecutive_gateway_failure": 2,  # 502/503/504 incl. upstream timeouts: the slow or stuck host
            # consecutive_5xx stays at Envoy's default (5).
            "interval": "1s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 100,  # a whole site may go: the aggregate then moves to the next priority
        },
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},  # never spray traffic at dead hosts
    }


def envoy_config(cfg: StackConfig, cloud_host: str | None) -> dict:
    """Envoy bootstrap. `cloud_host`: DNS name of the cloud Service (None: no cloud cluster)."""
    if not (cfg.routing and cfg.onprem):
        raise ConfigError("deepfleet:routing: needs routing and onprem sections")
    t = timings(cfg.routing.switchover_ms)
    clusters = [
        _cluster("onprem", [(h.address, API_PORT) for h in cfg.onprem.hosts], t["onprem_connect_timeout_ms"], dns=False)
    ]
    priorities = ["onprem"]
    if cloud_host:
        clusters.append(_cluster("cloud", [(cloud_host, API_PORT)], CLOUD_CONNECT_TIMEOUT_MS, dns=True))
        priorities.append("cloud")
    clusters.append(
        {
            "name": "hybrid",
            "connect_timeout": _ms(t["onprem_connect_timeout_ms"]),
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.aggregate",
                "typed_config": {"@type": _AGGREGATE, "clusters": priorities},
            },
        }
    )
    routes = []
    if cfg.edge:
        clusters.append(
            _cluster(
                "edge", [(d.address, API_PORT) for d in cfg.edge.devices], t["onprem_connect_timeout_ms"], dns=False
            )
        )
        routes.append(
            {
                "match": {"prefix": "/", "headers": [{"name": EDGE_HEADER, "string_match": {"exact": "edge"}}]},
                "route": {"cluster": "edge", "timeout": f"{ROUTE_TIMEOUT_S}s"},
            }
        )
    routes.append(
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "hybrid",
                "timeout": f"{ROUTE_TIMEOUT_S}s",
                "retry_policy": {
                    "retry_on": "connect-failure,reset,retriable-status-codes",
                    "retriable_status_codes": [503],
                    "num_retries": 2,
                    "retry_back_off": {
                        "base_interval": _ms(t["retry_base_ms"]),
                        "max_interval": _ms(t["retry_max_ms"]),
                    },
                    "retry_priority": {
                        "name": "envoy.retry_priorities.previous_priorities",
                        "typed_config": {"@type": _PREVIOUS_PRIORITIES, "update_frequency": 1},
                    },
                    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
                },
            },
        }
    )
    listener = {
        "name": "deepfleet",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": cfg.routing.listen_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": _HCM,
                            "stat_prefix": "deepfleet",
                            "route_config": {
                                "name": "deepfleet",
                                "virtual_hosts": [{"name": "deepfleet", "domains": ["*"], "routes": routes}],
                            },
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
                        },
                    }
                ]
            }
        ],
    }
    config = {
        "static_resources": {"listeners": [listener], "clusters": clusters},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
    }
    budget = switchover_budget_ms(config)
    if budget > cfg.routing.switchover_ms:
        raise ConfigError(f"deepfleet:routing.switchover_ms: failover takes up to {budget} ms")
    return config


def _seconds_ms(value: str) -> float:
    return float(value.removesuffix("s")) * 1000


def switchover_budget_ms(config: dict) -> float:
    """Worst case from a request hitting a dead on-prem host to it running on the next priority: the on-prem
    connect timeout plus the longest retry back-off (the first retry already goes to the next priority)."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"
    ]["virtual_hosts"][0]["routes"]
    retry = next(r["route"]["retry_policy"] for r in routes if r["route"]["cluster"] == "hybrid")
    return _seconds_ms(clusters["onprem"]["connect_timeout"]) + _seconds_ms(retry["retry_back_off"]["max_interval"])


class HybridRouter(pulumi.ComponentResource):
    """The Envoy configuration as a ConfigMap plus an Envoy Deployment and Service next to the workload."""

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: str,
        cloud_host: str | None,
        provider: k8s.Provider,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("deepfleet:hybrid:Router", name, None, opts)
        self.config = envoy_config(cfg, cloud_host)
        self.config_yaml = yaml.safe_dump(self.config, sort_keys=False)
        child = pulumi.ResourceOptions(parent=self, provider=provider)
        labels = {"app.kubernetes.io/name": "deepfleet-router", "app.kubernetes.io/component": "router"}
        meta = {"name": "deepfleet-router", "namespace": namespace, "labels": labels}
        port = cfg.routing.listen_port
        k8s.core.v1.ConfigMap(f"{name}-config", metadata=meta, data={"envoy.yaml": self.config_yaml}, opts=child)
        k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata=meta,
            spec={
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 101,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "envoy",
                                "image": ENVOY_IMAGE,
                                "args": ["--config-path", "/etc/envoy/envoy.yaml"],
                                "ports": [{"name": "http", "containerPort": port}],
                                "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 5},
                                "resources": {
                                    "requests": {"cpu": "500m", "memory": "256Mi"},
                                    "limits": {"cpu": "2", "memory": "1Gi"},
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                                "volumeMounts": [
                                    {"name": "config", "mountPath": "/etc/envoy", "readOnly": True},
                                    {"name": "tmp", "mountPath": "/tmp"},  # read-only root: scratch space
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "config", "configMap": {"name": "deepfleet-router"}},
                            {"name": "tmp", "emptyDir": {}},
                        ],
                    },
                },
            },
            opts=child,
        )
        k8s.core.v1.Service(
            f"{name}-service",
            metadata=meta,
            spec={"selector": labels, "ports": [{"name": "http", "port": port, "targetPort": "http"}]},
            opts=child,
        )
        self.register_outputs({"envoy_config": self.config_yaml})
