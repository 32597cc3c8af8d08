"""The security building blocks without a server: JWKS and policy files (and their refusals naming file and
field), policy decisions incl. ABAC time windows, the token bucket, start-up refusals and exposure warnings."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from auth_helpers import AUDIENCE, ISSUER, POLICY, Issuer, auth_settings
from typer.testing import CliRunner

from deepfleet.cli import app as cli_app
from deepfleet.security.errors import SecurityConfigError
from deepfleet.server.app import create_app
from deepfleet.server.auth.guard import exposure_warnings
from deepfleet.server.auth.policy import Policy
from deepfleet.server.auth.ratelimit import RateLimiter
from deepfleet.server.auth.tokens import AuthError, Principal, TokenVerifier, load_jwks
from deepfleet.server.config import ServeSettings, SettingsError, load_settings


def principal(*roles: str, **claims) -> Principal:
    return Principal("p", frozenset(roles), claims)


@pytest.fixture
def policy(tmp_path) -> Policy:
    (tmp_path / "p.yaml").write_text(POLICY)
    return Policy.load(tmp_path / "p.yaml")


def test_documents_roles(policy):
    assert policy.authorize(principal("model_admin"), "models/deepseek-r1", "delete", None).allowed
    assert not policy.authorize(principal("model_admin"), "models/deepseek-r1", "predict", None).allowed
    assert policy.authorize(principal("inference_user"), "models/tiny-r1", "predict", None).allowed
    assert not policy.authorize(principal("inference_user"), "models/other", "predict", None).allowed
    assert policy.authorize(principal("auditor"), "models/x", "read_logs", None).allowed
    assert not policy.authorize(principal("auditor"), "models/x", "predict", None).allowed
    assert policy.authorize(principal("admin"), "models/x", "deploy", None).allowed
    assert policy.authorize(principal("engineer"), "models/x", "update", None).allowed
    assert not policy.authorize(principal("engineer"), "models/x", "delete", None).allowed
    assert not policy.authorize(principal("unknown-role"), "models/x", "predict", None).allowed


def test_source_network_condition(policy):
    assert policy.authorize(principal("office_network"), "models/x", "predict", "10.1.2.3").allowed
    denied = policy.authorize(principal("office_network"), "models/x", "predict", "192.168.0.9")
    assert not denied.allowed and "request from 192.168.0.9" in denied.reason


def test_time_window_condition(tmp_path):
    (tmp_path / "p.yaml").write_text("""
roles:
  - name: day_shift
    policies:
      - resource: "models/*"
        actions: [predict]
        conditions:
          time_window: {start: "08:00", end: "18:00", timezone: Europe/Berlin, days: [mon, tue, wed, thu, fri]}
""")
    policy = Policy.load(tmp_path / "p.yaml")
    tuesday_noon_berlin = dt.datetime(2026, 12, 1, 11, 0, tzinfo=dt.timezone.utc)  # 12:00 CET
    tuesday_evening = dt.datetime(2026, 12, 1, 18, 30, tzinfo=dt.timezone.utc)  # 19:30 CET
    saturday_noon = dt.datetime(2026, 12, 5, 11, 0, tzinfo=dt.timezone.utc)
    assert policy.authorize(principal("day_shift"), "models/x", "predict", None, tuesday_noon_berlin).allowed
    assert not policy.authorize(principal("day_shift"), "models/x", "predict", None, tuesday_evening).allowed
    assert not policy.authorize(principal("day_shift"), "models/x", "predict", None, saturday_noon).allowed


@pytest.mark.parametrize("text, field", [
    ("roles: [", "not valid YAML"),
    ("roles: []", "roles: List should have at least 1 item"),
    ("roles:\n  - name: a\n    policies:\n      - resource: m\n        actions: [fly]\n",
     "roles[0].policies[0].actions[0]"),
    ("roles:\n  - name: a\n    polices: []\n", "roles[0].polices"),
    ("roles:\n  - name: a\n  - name: a\n", "role names appear twice"),
    ("roles:\n  - name: a\n    policies:\n      - resource: m\n        actions: [predict]\n        conditions:\n"
     "          time_window: {start: \"08:00\", end: 18:00}\n", "roles[0].policies[0].conditions.time_window.end"),
    ("roles:\n  - name: a\n    policies:\n      - resource: m\n        actions: [predict]\n        conditions:\n"
     "          source_networks: [10.0.0.300/8]\n", "roles[0].policies[0].conditions.source_networks[0]"),
])
def test_bad_policy_files_name_file_and_field(tmp_path, text, field):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(SecurityConfigError) as e:
        Policy.load(tmp_path / "p.yaml")
    assert f"auth.policy_file {tmp_path / 'p.yaml'}" in str(e.value) and field in str(e.value)


@pytest.mark.parametrize("text, field", [
    ("{", "not valid JSON"),
    ('{"keys": []}', "keys: must be a non-empty list"),
    ('{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', "keys[0].kid: required"),
    ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}, {"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]}',
     "keys[1].kid: 'a' appears twice"),
    ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "bad", "y": "bad", "kid": "e"}]}', "keys[0]: not a usable key"),
])
def test_bad_jwks_files_name_file_and_field(tmp_path, text, field):
    (tmp_path / "jwks.json").write_text(text)
    with pytest.raises(SecurityConfigError) as e:
        load_jwks(tmp_path / "jwks.json")
    assert f"auth.jwks_file {tmp_path / 'jwks.json'}" in str(e.value) and field in str(e.value)


def test_leeway_and_roles_claim(tmp_path):
    issuer = Issuer()
    verifier = TokenVerifier(issuer.write_jwks(tmp_path / "j.json"), ISSUER, AUDIENCE, "groups", 30)
    ok = verifier.verify("Bearer " + issuer.token(lifetime=-10, groups="a b", roles=None))  # 10 s past exp
    assert ok.roles == {"a", "b"} and ok.subject == "alice"
    with pytest.raises(AuthError, match="expired"):
        verifier.verify("Bearer " + issuer.token(lifetime=-60))
    with pytest.raises(AuthError, match="required claim 'sub'"):
        verifier.verify("Bearer " + issuer.token(sub=None))
    with pytest.raises(AuthError, match="expected 'Bearer <JWT>'"):
        verifier.verify("Basic dXNlcjpwYXNz")


def test_token_bucket_refills_at_the_per_minute_rate():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert all(limiter.hit("a", 60).allowed for _ in range(60))
    refused = limiter.hit("a", 60)
    assert not refused.allowed and refused.retry_after_s == 1 and refused.headers()["Retry-After"] == "1"
    now[0] += 1.0  # one token back per second at 60/min
    assert limiter.hit("a", 60).allowed and not limiter.hit("a", 60).allowed
    now[0] += 60
    decision = limiter.hit("a", 60)
    assert decision.remaining == 59 and decision.headers()["X-RateLimit-Limit"] == "60"


def test_start_refused_for_bad_security_settings(tmp_path):
    issuer = Issuer()
    settings = auth_settings(tmp_path, issuer)
    with pytest.raises(SecurityConfigError, match="auth.policy_file: required"):
        create_app(ServeSettings(model="m", auth={**settings["auth"], "policy_file": None}), lambda s: None)
    with pytest.raises(SecurityConfigError, match="set without auth.jwks_file"):
        create_app(ServeSettings(model="m", auth={"policy_file": settings["auth"]["policy_file"]}), lambda s: None)
    with pytest.raises(SettingsError, match="auth.jwks_fil: Extra inputs are not permitted"):
        load_settings(overrides={"model": "m", "auth": {"jwks_fil": "x"}}, env={})
    with pytest.raises(SettingsError, match="tls.min_version: Extra inputs"):
        load_settings(overrides={"model": "m", "tls": {"min_version": "1.2"}}, env={})


def test_security_settings_from_the_environment(tmp_path):
    s = load_settings(overrides={"model": "m"}, env={"DEEPFLEET_AUTH__JWKS_FILE": "/etc/deepfleet/jwks.json",
                                                     "DEEPFLEET_TLS__CERT_FILE": "/etc/deepfleet/tls.crt"})
    assert str(s.auth.jwks_file) == "/etc/deepfleet/jwks.json" and s.auth.enabled and s.tls.enabled


def test_serve_refuses_to_start_naming_the_file(tmp_path, tiny_model):
    issuer = Issuer()
    settings = auth_settings(tmp_path, issuer)
    (tmp_path / "policy.yaml").write_text("roles:\n  - name: a\n    policies:\n      - resource: m\n"
                                          "        actions: [fly]\n")
    (tmp_path / "serve.yaml").write_text(json.dumps({**settings, "host": "127.0.0.1"}))
    out = CliRunner().invoke(cli_app, ["serve", str(tiny_model), "--config", str(tmp_path / "serve.yaml")])
    assert out.exit_code == 2, out.output
    assert f"auth.policy_file {tmp_path / 'policy.yaml'}: roles[0].policies[0].actions[0]" in out.output


def test_loud_warning_beyond_loopback_without_auth():
    assert exposure_warnings(ServeSettings(model="m", host="127.0.0.1")) == []
    warnings = exposure_warnings(ServeSettings(model="m", host="0.0.0.0"))
    assert "WITHOUT AUTHENTICATION" in warnings[0] and "without TLS" in warnings[1]
    secured = ServeSettings(model="m", host="0.0.0.0", auth={"jwks_file": "j", "policy_file": "p"},
                            tls={"cert_file": "c", "key_file": "k"})
    assert exposure_warnings(secured) == []


def test_admin_routes_are_refused_when_auth_is_off():
    from fastapi.testclient import TestClient

    app = create_app(ServeSettings(model="m"), lambda s: None)
    with TestClient(app) as client:
        r = client.post("/admin/models/m/unload")
        assert r.status_code == 403 and r.json()["error"]["code"] == "auth_disabled"
