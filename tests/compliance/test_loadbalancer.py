"""What roles/loadbalancer does: HAProxy with the configured balancing, /readyz health checks on every
runtime host, retries on another host, the runtime API socket, and requests answered through it."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def lb(inventory, rendered_settings) -> dict:
    if "loadbalancers" not in inventory["group_names"]:
        pytest.skip("not a load balancer (group loadbalancers)")
    return rendered_settings("loadbalancer")


def admin(host, lb, command: str) -> str:
    return host.check_output(f"echo '{command}' | socat stdio unix-connect:{lb['deepfleet_lb_admin_socket']}")


def test_haproxy_installed_valid_running(host, lb):
    assert host.package("haproxy").is_installed
    assert host.run("haproxy -c -f /etc/haproxy/haproxy.cfg").rc == 0
    service = host.service("haproxy")
    assert service.is_enabled and service.is_running


def test_balancing_and_health_checks(host, lb):
    cfg = host.file("/etc/haproxy/haproxy.cfg").content_string
    if lb["loadbalancer_balance"] == "consistent_hash":
        assert f"balance {lb['loadbalancer_hash_key']}" in cfg and "hash-type consistent" in cfg
    else:
        assert f"balance {lb['loadbalancer_balance']}" in cfg
    assert "http-check send meth GET uri /readyz" in cfg
    assert "http-check expect status 200" in cfg
    assert "option redispatch" in cfg and f"retries {lb['loadbalancer_retries']}" in cfg
    # failover timing (measured by `make drill`): check cadence, confirmation, hung-host timeout, passive check
    assert (f"check inter {lb['loadbalancer_check_inter']} fastinter {lb['loadbalancer_check_fastinter']} "
            f"fall {lb['loadbalancer_check_fall']}") in cfg
    assert f"timeout check {lb['loadbalancer_check_timeout']}" in cfg
    assert ("observe layer4 error-limit 1 on-error mark-down" in cfg) == lb["loadbalancer_observe_connections"]


def test_every_runtime_host_is_up_in_the_backend(host, lb):
    stat = admin(host, lb, "show stat").splitlines()
    rows = [r.split(",") for r in stat if r.startswith(lb["deepfleet_lb_backend"] + ",")]
    servers = {r[1]: r[17] for r in rows if r[1] not in ("BACKEND", "FRONTEND")}
    runtime_hosts = lb["groups"][lb["loadbalancer_backend_group"]]
    assert sorted(servers) == sorted(runtime_hosts)
    assert all(status == "UP" for status in servers.values()), servers


def test_request_through_the_load_balancer(host, lb):
    if not lb["loadbalancer_http"]:
        pytest.skip("loadbalancer_http is false (TLS only): test_tls_frontend_when_enabled")
    url = f"http://127.0.0.1:{lb['loadbalancer_port']}"
    if host.run(f"curl -fsS {url}/v1/models -o /dev/null -w '%{{http_code}}'").stdout == "401":
        pytest.skip("the runtime requires tokens: test_security.py checks this frontend with them")
    out = host.check_output(f"curl -fsS {url}/v1/models")
    assert json.loads(out)["data"], out


def test_tls_frontend_when_enabled(host, lb):
    if not lb["loadbalancer_tls"]:
        pytest.skip("loadbalancer_tls is false")
    url = f"https://127.0.0.1:{lb['loadbalancer_tls_port']}/healthz"  # open: no token needed
    res = host.run(f"curl -fsSk --tlsv1.3 {url}")
    assert res.rc == 0, res.stderr
    assert host.run(f"curl -fsSk --tls-max 1.2 {url}").rc != 0
    if not lb["loadbalancer_http"]:
        assert host.run(f"curl -sS -m 5 http://127.0.0.1:{lb['loadbalancer_port']}/healthz").rc != 0
