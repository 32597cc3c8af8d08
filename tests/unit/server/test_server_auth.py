"""Authentication, authorization, rate limits and the audit log on a real server (real engine, tiny model) with
auth on: every control refuses its failing input with the right status and writes its audit line."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx
import jsonschema
import jwt as pyjwt
import pytest
from auth_helpers import AUDIENCE, ISSUER, Issuer, audit_lines, auth_settings, bearer
from cryptography.hazmat.primitives import serialization
from server_helpers import MODEL_NAME, live_server, settings_for

PROMPT = "the secret prompt text 4711"


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def secured(tiny_model, tmp_path_factory, issuer):
    tmp = tmp_path_factory.mktemp("auth")
    with live_server(settings_for(tiny_model, **auth_settings(tmp, issuer))) as s, httpx.Client(
        base_url=s.url, timeout=60
    ) as client:
        client.audit_path = tmp / "audit.jsonl"
        client.policy_path = tmp / "policy.yaml"
        client.live = s
        yield client


def last_event(client, event: str) -> dict:
    events = [e for e in audit_lines(client.audit_path) if e["event"] == event]
    assert events, f"no {event} in the audit log"
    return events[-1]


def chat(client, token: str | None, **extra):
    headers = bearer(token) if token else {}
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_probes_stay_open(secured):
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/health").status_code == 200
    assert secured.get("/readyz").status_code == 200
    assert secured.get("/metrics").status_code == 200  # open unless auth.protect_metrics


def test_model_loaded_is_audited_at_start(secured):
    event = last_event(secured, "MODEL_LOADED")
    assert event["model_id"] == MODEL_NAME and event["severity"] == "info" and event["auth"] == "on"
    assert set(event) >= {"timestamp", "event", "user", "model_id", "ip", "severity"}


def test_valid_token_is_served_with_rate_limit_headers(secured, issuer):
    r = chat(secured, issuer.token(sub="valid-user"))
    assert r.status_code == 200, r.text
    assert r.headers["X-RateLimit-Limit"] == "100" and int(r.headers["X-RateLimit-Remaining"]) == 99


@pytest.mark.parametrize("kid", ["ec-1", "hs-1"])
def test_es256_and_hs256_keys_are_accepted(secured, issuer, kid):
    assert chat(secured, issuer.token(sub=f"user-{kid}", kid=kid)).status_code == 200


def _bad_tokens(issuer: Issuer) -> dict[str, tuple[str | None, str]]:
    now = int(time.time())
    return {
        "missing": (None, "missing bearer token"),
        "expired": (issuer.token(lifetime=-120), "token expired"),  # beyond the 30 s leeway
        "not-yet-valid": (issuer.token(nbf=now + 600), "token not yet valid"),
        "wrong-audience": (issuer.token(aud="someone-else"), "wrong audience"),
        "wrong-issuer": (issuer.token(iss="https://evil.test"), "wrong issuer"),
        "forged-signature": (issuer.forged(), "signature verification failed"),
        "unknown-kid": (issuer.token(kid="nope"), "unknown key id"),
        "garbage": ("not.a.jwt", "malformed token"),
        "alg-none": (pyjwt.encode({"sub": "x", "exp": now + 60}, None, algorithm="none", headers={"kid": "rsa-1"}),
                     "token algorithm does not match its key"),
    }


@pytest.mark.parametrize("case", ["missing", "expired", "not-yet-valid", "wrong-audience", "wrong-issuer",
                                  "forged-signature", "unknown-kid", "garbage", "alg-none"])
def test_bad_tokens_get_401_and_an_audit_line(secured, issuer, case):
    token, reason = _bad_tokens(issuer)[case]
    r = chat(secured, token)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_token" and reason in r.json()["error"]["message"]
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    event = last_event(secured, "AUTH_FAILED")
    assert reason in event["reason"] and event["ip"] == "127.0.0.1" and event["severity"] == "warning"
    assert event["path"] == "/v1/chat/completions"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_hs256_with_the_rsa_public_key_as_secret_is_refused(secured, issuer):
    """Algorithm confusion: a token HMAC-signed with the RSA key's public PEM as the secret must not verify."""
    pem = issuer.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    claims = _b64(json.dumps({"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60,
                              "roles": ["admin"]}).encode())
    signature = _b64(hmac.new(pem, f"{header}.{claims}".encode(), hashlib.sha256).digest())
    r = chat(secured, f"{header}.{claims}.{signature}")
    assert r.status_code == 401 and "algorithm" in r.json()["error"]["message"]


def test_no_role_gets_403_and_an_audit_line(secured, issuer):
    r = chat(secured, issuer.token(sub="nobody", roles=[]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    event = last_event(secured, "ACCESS_DENIED")
    assert event["user"] == "nobody" and event["action"] == "predict" and event["resource"] == f"models/{MODEL_NAME}"


def test_abac_claim_rule(secured, issuer):
    assert chat(secured, issuer.token(sub="ml-person", roles=["ml_only"], department="ml")).status_code == 200
    r = chat(secured, issuer.token(sub="sales-person", roles=["ml_only"], department="sales"))
    assert r.status_code == 403 and "claim department" in r.json()["error"]["message"]
    assert "claim department in ['ml']" in last_event(secured, "ACCESS_DENIED")["reason"]


def test_abac_source_network_rule(secured, issuer):
    r = chat(secured, issuer.token(sub="remote", roles=["office_network"]))
    assert r.status_code == 403  # the test client comes from 127.0.0.1, not 10.0.0.0/8
    assert "request from 127.0.0.1" in last_event(secured, "ACCESS_DENIED")["reason"]


def test_the_101st_request_in_a_minute_gets_429(secured, issuer, monkeypatch):
    # The bucket refills 100/60 tokens a second: on this loaded machine 100 requests can take seconds, so the
    # server's limiter clock stands still while they are sent (the refill itself: test_server_auth_units).
    monkeypatch.setattr(secured.live.app.state.guard.limiter, "_clock", lambda: 1000.0)
    token = issuer.token(sub="busy-user")
    statuses = [secured.get("/v1/models", headers=bearer(token)).status_code for _ in range(100)]
    assert statuses == [200] * 100
    r = secured.get("/v1/models", headers=bearer(token))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["Retry-After"] == "1" and r.headers["X-RateLimit-Remaining"] == "0"  # 0.6 s to one token
    event = last_event(secured, "RATE_LIMITED")
    assert event["user"] == "busy-user" and event["limit_per_minute"] == 100
    # per principal: another subject is not affected
    assert secured.get("/v1/models", headers=bearer(issuer.token(sub="calm-user"))).status_code == 200


def test_per_role_rate_limit_from_the_policy(secured, issuer):
    r = secured.get("/v1/models", headers=bearer(issuer.token(sub="bulk-user", roles=["bulk"])))
    assert r.headers["X-RateLimit-Limit"] == "100000"


def test_malformed_and_oversize_requests_are_audited(secured, issuer):
    token = issuer.token(sub="sloppy")
    r = secured.post("/v1/chat/completions", content=b"{not json", headers=bearer(token))
    assert r.status_code == 400
    event = last_event(secured, "ABNORMAL_REQUEST")
    assert event["user"] == "sloppy" and event["status"] == 400 and event["code"] == "invalid_json"
    r = secured.post("/v1/chat/completions", content=b"x" * (5 << 20), headers=bearer(token))
    assert r.status_code == 413
    assert last_event(secured, "ABNORMAL_REQUEST")["code"] == "body_too_large"


def test_auditor_reads_the_log_and_others_cannot(secured, issuer):
    assert secured.get("/admin/audit", headers=bearer(issuer.token(sub="eve"))).status_code == 403
    r = secured.get("/admin/audit", params={"limit": 5}, headers=bearer(issuer.token(sub="aud", roles=["auditor"])))
    assert r.status_code == 200 and len(r.json()["events"]) == 5
    assert last_event(secured, "AUDIT_READ")["user"] == "aud"


def test_inference_user_cannot_unload_or_reload(secured, issuer):
    token = issuer.token(sub="bob")
    assert secured.post(f"/admin/models/{MODEL_NAME}/unload", headers=bearer(token)).status_code == 403
    assert secured.post("/admin/policy/reload", headers=bearer(token)).status_code == 403
    assert secured.live.state.phase == "ready"


def test_policy_reload_swaps_rules_and_a_bad_file_keeps_the_old_one(secured, issuer):
    admin = bearer(issuer.token(sub="root", roles=["model_admin"]))
    original = secured.policy_path.read_text()
    newcomer = issuer.token(sub="newcomer", roles=["newcomer"])
    assert chat(secured, newcomer).status_code == 403
    try:
        secured.policy_path.write_text(original + "  - name: newcomer\n    policies:\n"
                                       "      - resource: \"models/*\"\n        actions: [predict]\n")
        r = secured.post("/admin/policy/reload", headers=admin)
        assert r.status_code == 200, r.text
        assert last_event(secured, "POLICY_RELOADED")["user"] == "root"
        assert chat(secured, newcomer).status_code == 200
        bad = "roles:\n  - name: x\n    policies:\n      - resource: m\n        actions: [fly]\n"
        secured.policy_path.write_text(bad)
        r = secured.post("/admin/policy/reload", headers=admin)
        assert r.status_code == 400 and "roles[0].policies[0].actions[0]" in r.json()["error"]["message"]
        assert last_event(secured, "POLICY_RELOAD_FAILED")["severity"] == "error"
        assert chat(secured, newcomer).status_code == 200  # the previous policy is still in force
    finally:
        secured.policy_path.write_text(original)
        assert secured.post("/admin/policy/reload", headers=admin).status_code == 200


def test_model_admin_unloads_drained_and_loads_again(secured, issuer):
    admin = bearer(issuer.token(sub="ops", roles=["model_admin"]))
    user = issuer.token(sub="waiting-user")
    r = secured.post(f"/admin/models/{MODEL_NAME}/unload", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "unloaded", r.text
    assert last_event(secured, "MODEL_UNLOADED")["user"] == "ops"
    assert secured.get("/readyz").status_code == 503 and secured.get("/healthz").status_code == 200
    r = chat(secured, user)
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    assert secured.post("/admin/models/other-model/load", headers=admin).status_code == 404
    r = secured.post(f"/admin/models/{MODEL_NAME}/load", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    assert last_event(secured, "MODEL_LOADED")["user"] == "ops"
    assert chat(secured, user).status_code == 200


def test_no_token_or_prompt_in_the_audit_log(secured, issuer):
    token = issuer.token(sub="careful")
    chat(secured, token)
    chat(secured, token + "x")
    text = secured.audit_path.read_text()
    assert token not in text and token.split(".")[1] not in text and PROMPT not in text
    assert secured.audit_path.stat().st_mode & 0o777 == 0o640


def test_lora_adapter_routes_need_model_admin_deploy_and_delete(secured, issuer):
    body = {"lora_name": "ad", "lora_path": "/nonexistent"}
    for roles in ([], ["inference_user"], ["engineer"]):  # engineer holds predict + update, not deploy/delete
        token = bearer(issuer.token(sub="eve", roles=roles))
        assert secured.post("/v1/load_lora_adapter", json=body, headers=token).status_code == 403, roles
        assert secured.post("/v1/unload_lora_adapter", json={"lora_name": "ad"}, headers=token).status_code == 403
    admin = bearer(issuer.token(sub="ops", roles=["model_admin"]))
    r = secured.post("/v1/load_lora_adapter", json=body, headers=admin)  # through the guard: LoRA is off here
    assert r.status_code == 400 and "LoRA is off" in r.json()["error"]["message"]
    assert secured.post("/v1/unload_lora_adapter", json={"lora_name": "ad"}, headers=admin).status_code == 404


# What each refusal of the middleware must look like (written down here, not read from the code).
REFUSALS = {
    401: ("authentication_error", "invalid_token", {"WWW-Authenticate"}),
    403: ("permission_error", "forbidden", {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}),
    429: ("rate_limit_error", "rate_limit_exceeded",
          {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}),
}


def test_openapi_documents_the_401_403_429_the_server_sends(secured, issuer, monkeypatch):
    doc = secured.get("/openapi.json", headers=bearer(issuer.token(sub="reader"))).json()
    assert doc["components"]["securitySchemes"]["bearerJWT"]["scheme"] == "bearer"
    guard = secured.live.app.state.guard
    monkeypatch.setattr(guard.limiter, "_clock", lambda: 2000.0)
    spent = issuer.token(sub="doc-spent")
    for _ in range(100):  # the real limiter's bucket for this subject, emptied without 100 round trips
        guard.limiter.hit("doc-spent", 100)
    answers = {
        401: ("/v1/models", "get", secured.get("/v1/models")),
        403: ("/admin/audit", "get", secured.get("/admin/audit", headers=bearer(issuer.token(sub="doc-nobody")))),
        429: ("/v1/chat/completions", "post", chat(secured, spent)),
    }
    for status, (path, method, r) in answers.items():
        kind, code, headers = REFUSALS[status]
        assert r.status_code == status, r.text
        assert r.json()["error"]["type"] == kind and r.json()["error"]["code"] == code
        assert all(h in r.headers for h in headers), (status, dict(r.headers))  # case-insensitive
        op = doc["paths"][path][method]
        assert op["security"][0] == {"bearerJWT": []}
        documented = op["responses"][str(status)]
        assert headers <= set(documented["headers"]), (status, documented["headers"])
        media = documented["content"]["application/json"]
        validator = jsonschema.Draft202012Validator({**media["schema"], "components": doc["components"]})
        assert not list(validator.iter_errors(r.json())), (status, r.json())
        assert code in {e["value"]["error"]["code"] for e in media["examples"].values()}
    # the missing-token and the rate-limit examples are the very bodies sent
    examples = doc["paths"]["/v1/models"]["get"]["responses"]["401"]["content"]["application/json"]["examples"]
    assert examples["missing_token"]["value"] == answers[401][2].json()
    examples = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["429"]["content"]["application/json"]
    assert examples["examples"]["rate_limited"]["value"] == answers[429][2].json()
    for probe in ("/healthz", "/health", "/readyz"):  # open: no token, no refusals
        assert "security" not in doc["paths"][probe]["get"] and "401" not in doc["paths"][probe]["get"]["responses"]


def test_admin_query_parameters_are_refused_with_a_400_in_the_error_shape(secured, issuer):
    r = secured.get("/admin/audit", params={"limit": 0}, headers=bearer(issuer.token(sub="aud", roles=["auditor"])))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "limit" and r.json()["error"]["code"] == "invalid_parameter"
