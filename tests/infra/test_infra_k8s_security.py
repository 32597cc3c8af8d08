"""Security of the Kubernetes workload: the Secrets named in `workload.security` mounted read-only into the
runtime, the settings pointing at them, HTTPS probes and Service port, the ServiceMonitor scraping over TLS
1.3 with the Secret's CA, the NetworkPolicy unchanged; and the Pulumi policy that fails a stack whose config
holds a secret value in plain text."""

from __future__ import annotations

import pytest
from infra_capture import k8s_manifests

from infra.config import WorkloadSecurity
from infra.k8s_security import pod_security
from infra.mocks import Capture
from infra.policies import plain_secrets_in_stack_config, stack_config_violations


def _one(capture: Capture, kind: str, name: str) -> dict:
    return next(m for m in k8s_manifests(capture) if m["kind"] == kind and m["metadata"]["name"] == name)


def _runtime(capture: Capture) -> dict:
    pod = _one(capture, "Deployment", "deepfleet")["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "runtime")


def test_secrets_are_mounted_read_only_and_used(aws_stack: Capture) -> None:
    pod, runtime = _runtime(aws_stack)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"] == {"secretName": "deepfleet-tls", "defaultMode": 0o440,
                                        "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                  {"key": "tls.key", "path": "tls.key"}]}
    assert volumes["auth"]["secret"]["secretName"] == "deepfleet-auth"
    mounts = {m["name"]: m for m in runtime["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/deepfleet/tls", "readOnly": True}
    assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/deepfleet/auth", "readOnly": True}
    assert mounts["audit"]["mountPath"] == "/var/log/deepfleet" and "readOnly" not in mounts["audit"]
    command = runtime["command"]
    for flag in ("tls.cert_file=/etc/deepfleet/tls/tls.crt", "tls.key_file=/etc/deepfleet/tls/tls.key",
                 "auth.jwks_file=/etc/deepfleet/auth/jwks.json", "auth.policy_file=/etc/deepfleet/auth/policy.yaml",
                 "auth.issuer=https://auth.example.com", "auth.audience=deepfleet",
                 "audit.path=/var/log/deepfleet/audit.jsonl"):
        assert command[command.index(flag) - 1] == "--set", flag


def test_tls_on_the_service_probes_and_scrapes(aws_stack: Capture) -> None:
    _pod, runtime = _runtime(aws_stack)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert runtime[probe]["httpGet"]["scheme"] == "HTTPS" and runtime[probe]["httpGet"]["port"] == "https"
    service = _one(aws_stack, "Service", "deepfleet")
    assert service["spec"]["ports"] == [{"name": "https", "port": 8000, "targetPort": "https", "protocol": "TCP",
                                         "appProtocol": "https"}]
    (endpoint,) = _one(aws_stack, "ServiceMonitor", "deepfleet")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "deepfleet-tls", "key": "ca.crt"}}, "serverName": "deepfleet.deepfleet.svc",
        "minVersion": "TLS13"}
    netpol = _one(aws_stack, "NetworkPolicy", "deepfleet")
    assert netpol["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_without_secrets_the_pod_serves_plain_http_with_an_audit_log(onprem_stack: Capture) -> None:
    pod, runtime = _runtime(onprem_stack)
    assert runtime["ports"][0]["name"] == "http" and runtime["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert not any("secret" in v for v in pod["volumes"])
    assert "audit.path=/var/log/deepfleet/audit.jsonl" in runtime["command"]


def test_audit_log_is_bounded_below_its_emptydir_limit(aws_stack: Capture) -> None:
    pod, runtime = _runtime(aws_stack)
    volumes = {v["name"]: v for v in pod["volumes"]}
    # default 64 MiB per file, the current one and 4 rotated ones: 320 MiB, with a quarter on top
    assert volumes["audit"]["emptyDir"] == {"sizeLimit": "400Mi"}
    command = runtime["command"]
    assert command[command.index("audit.max_bytes=67108864") - 1] == "--set"
    small = pod_security(WorkloadSecurity(audit_max_mib=8), "/models/m")
    assert small.settings["audit"]["max_bytes"] == 8 << 20
    assert small.volumes[0] == {"name": "audit", "emptyDir": {"sizeLimit": "50Mi"}}
    with pytest.raises(ValueError, match="audit_max_mib"):
        WorkloadSecurity(audit_max_mib=0)


def test_weights_key_secret_and_bad_security_config() -> None:
    sec = pod_security(WorkloadSecurity(weights_key_secret="model-key"), "/models/m")
    assert sec.settings["weights"] == {"key_file": "/etc/deepfleet/weights-key/weights.key"}
    with pytest.raises(ValueError, match="issuer/audience: set auth_secret too"):
        WorkloadSecurity(issuer="https://x")


@pytest.mark.parametrize("config, where", [
    ({"workload": {"security": {"tls_key": "-----BEGIN PRIVATE KEY-----\nMIIE..."}}}, "workload.security.tls_key"),
    ({"workload": {"image": "x", "env": {"DEEPFLEET_PKCS11_PIN": "1234"}}}, "workload.env.DEEPFLEET_PKCS11_PIN"),
    ({"aws": {"api_token": "abc123"}}, "aws.api_token"),
    ({"routing": {"headers": ["Authorization: Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"]}},
     "routing.headers[0]"),
    ({"storage": {"password": "hunter2"}}, "storage.password"),
])
def test_plain_secret_in_stack_config_fails(config, where) -> None:
    violations = plain_secrets_in_stack_config(config)
    assert [v.resource for v in violations] == [where]
    assert violations[0].policy == "no-plain-secrets-in-stack-config"


def test_encrypted_values_and_references_pass() -> None:
    ok = {"workload": {"security": {"tls_secret": "deepfleet-tls", "auth_secret": "deepfleet-auth"}},
          "aws": {"api_token": {"secure": "v1:abcd=="}}, "onprem": {"ssh_key_file": "~/.ssh/id_ed25519"}}
    assert plain_secrets_in_stack_config(ok) == []


@pytest.mark.parametrize("stack", ["aws", "onprem", "hybrid"])
def test_example_stacks_hold_no_plain_secret(stack) -> None:
    assert stack_config_violations(stack) == []
