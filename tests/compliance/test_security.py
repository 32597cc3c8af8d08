"""Security on the hosts (issue 13): TLS 1.3 only on the runtime and on the load balancer (openssl s_client:
1.3 accepted and the certificate verified, 1.2 refused), requests without a token refused (directly and
through the load balancer) and a completion with one answered through it, the audit log present with its owner
and mode and bounded by its logrotate policy (read by `logrotate --debug`; a forced rotation is the lab's test,
tests/lab/test_lab_serving.py), and no secret readable by other users."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def rt(host, rendered_settings) -> dict:
    if "gpu_nodes" not in host.ansible.get_variables()["group_names"]:
        pytest.skip("not a runtime host (group gpu_nodes)")
    return rendered_settings("inference_runtime")


@pytest.fixture
def lb(host, rendered_settings) -> dict:
    if "loadbalancers" not in host.ansible.get_variables()["group_names"]:
        pytest.skip("not a load balancer (group loadbalancers)")
    return rendered_settings("loadbalancer")


def size_bytes(size: str) -> int:
    """logrotate's size notation (100M) in bytes, as its debug output prints it."""
    units = {"k": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def handshake(host, port: int, version: str, ca_file: str | None):
    verify = f"-CAfile {ca_file} -verify_return_error" if ca_file else ""
    return host.run(f"openssl s_client -connect 127.0.0.1:{port} -{version} {verify} -brief </dev/null")


def status(host, url: str, ca_file: str | None) -> str:
    ca = f"--cacert {ca_file}" if ca_file else "-k"
    return host.check_output(f"curl -sS -m 30 {ca} -o /dev/null -w '%{{http_code}}' {url}")


def test_runtime_serves_tls13_only(host, rt):
    if not rt["deepfleet_tls"]:
        pytest.skip("deepfleet_tls is false")
    ok = handshake(host, rt["deepfleet_api_port"], "tls1_3", rt["deepfleet_ca_file"])
    assert ok.rc == 0 and "TLSv1.3" in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    refused = handshake(host, rt["deepfleet_api_port"], "tls1_2", rt["deepfleet_ca_file"])
    assert refused.rc != 0, refused.stdout


def test_runtime_refuses_requests_without_a_token(host, rt):
    if not rt["inference_runtime_jwks_src"]:
        pytest.skip("inference_runtime_jwks_src is empty: authentication off")
    scheme, ca = ("https", rt["deepfleet_ca_file"]) if rt["deepfleet_tls"] else ("http", None)
    base = f"{scheme}://127.0.0.1:{rt['deepfleet_api_port']}"
    assert status(host, f"{base}/v1/models", ca) == "401"
    assert status(host, f"{base}/readyz", ca) == "200"  # probes stay open


def test_audit_log_present_owner_and_mode(host, rt):
    log = host.file(rt["inference_runtime_audit_path"])
    assert log.is_file, log.path
    assert log.user == rt["inference_runtime_user"] and log.mode == 0o640
    directory = host.file(log.path.rsplit("/", 1)[0])
    assert directory.user == rt["inference_runtime_user"] and directory.mode == 0o750
    # the start may have been rotated away since (logrotate keeps it beside, compressed or not)
    assert '"event": "MODEL_LOADED"' in host.check_output(f"zcat -f {log.path}*")


def test_audit_log_rotation_policy(host, rt):
    policy = host.file("/etc/logrotate.d/deepfleet-audit")
    assert policy.is_file and policy.user == "root" and policy.mode == 0o644
    # logrotate's own reading of it, rotating nothing
    debug = host.run("logrotate --debug %s", policy.path)
    assert debug.rc == 0 and "error:" not in debug.stderr, debug.stderr
    out = debug.stdout + debug.stderr
    # daily, at most `keep` files, earlier past maxsize (looked at hourly), none older than maxage days
    assert (f"rotating pattern: {rt['inference_runtime_audit_path']}  after 1 days "
            f"({rt['inference_runtime_audit_rotate_keep']} rotations)") in out, out
    assert f"log files >= {size_bytes(rt['inference_runtime_audit_rotate_maxsize'])} are rotated earlier" in out, out
    assert f"maxage {rt['inference_runtime_audit_rotate_maxage']}" in policy.content_string
    uid = host.user(rt["inference_runtime_user"]).uid
    assert f"switching euid from 0 to {uid}" in out, out  # `su`: rotated as the service user, the file's owner
    timer = host.service("logrotate.timer")
    assert timer.is_enabled and timer.is_running
    assert "OnCalendar=hourly" in host.check_output("systemctl cat logrotate.timer")


def test_no_secret_readable_by_other_users(host, rt):
    paths = [rt["inference_runtime_security_dir"], rt["inference_runtime_config_file"],
             rt["inference_runtime_audit_path"] + "*"]
    readable = host.check_output(f"find {' '.join(paths)} -perm /o=rwx 2>/dev/null || true")
    assert readable == "", f"readable by other users: {readable}"
    if rt["deepfleet_tls"]:
        key = host.file(f"{rt['inference_runtime_security_dir']}/tls.key")
        assert key.user == "root" and key.group == rt["inference_runtime_group"] and key.mode == 0o640


def test_load_balancer_serves_tls13_only(host, lb):
    if not lb["loadbalancer_tls"]:
        pytest.skip("loadbalancer_tls is false")
    ca = lb["deepfleet_ca_file"] if lb["deepfleet_ca_src"] else None
    ok = handshake(host, lb["loadbalancer_tls_port"], "tls1_3", ca)
    assert ok.rc == 0 and "TLSv1.3" in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    assert handshake(host, lb["loadbalancer_tls_port"], "tls1_2", ca).rc != 0
    bundle = host.file(lb["loadbalancer_tls_cert"])
    assert bundle.mode in (0o600, 0o640) and bundle.user == "root"


def test_request_without_a_token_is_refused_through_the_load_balancer(host, lb, inventory):
    if not inventory.get("inference_runtime_jwks_src"):
        pytest.skip("the runtime hosts have no JWKS: authentication off")
    if lb["loadbalancer_tls"]:
        url = f"https://127.0.0.1:{lb['loadbalancer_tls_port']}/v1/models"
        ca = lb["deepfleet_ca_file"] if lb["deepfleet_ca_src"] else None
    else:
        url, ca = f"http://127.0.0.1:{lb['loadbalancer_port']}/v1/models", None
    assert status(host, url, ca) == "401"


def test_completion_with_a_token_through_the_load_balancer(host, lb, inventory, rendered_settings):
    tokens = inventory.get("deepfleet_lab_tokens_dir")
    if not tokens:
        pytest.skip("no test token in the inventory (deepfleet_lab_tokens_dir, which the lab sets)")
    token = Path(tokens, "inference_user.jwt").read_text().strip()  # on the controller, where the suite runs
    model = rendered_settings("inference_runtime")["inference_runtime_model_name"]
    body = json.dumps({"model": model, "prompt": "The fleet", "max_tokens": 3, "temperature": 0})
    if lb["loadbalancer_tls"]:
        url = f"https://127.0.0.1:{lb['loadbalancer_tls_port']}/v1/completions"
        ca = f"--cacert {lb['deepfleet_ca_file']}" if lb["deepfleet_ca_src"] else "-k"
    else:
        url, ca = f"http://127.0.0.1:{lb['loadbalancer_port']}/v1/completions", ""
    out = host.run(f"curl -fsS -m 60 {ca} -H %s -H 'Content-Type: application/json' -d %s {url}",
                   f"Authorization: Bearer {token}", body)
    assert out.rc == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model"] == model and 0 < answer["usage"]["completion_tokens"] <= 3, answer
