"""lab/pki.py: what `lab up` issues so the lab serves with everything on. Checked with the runtime's own
readers (TLS context, JWKS verifier, policy) and `cryptography`'s chain verification."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from deepfleet.server.auth.policy import Policy
from deepfleet.server.auth.tokens import TokenVerifier
from deepfleet.server.tls import TLSSettings, server_context
from lab import pki
from lab.state import Host, State


def lab_state(tmp_path: Path) -> State:
    state = State(name="t", state_dir=str(tmp_path / "state"), tag="t", subnet="10.77.9.0/24")
    state.hosts = [Host(f"lab-{i}", f"10.77.9.{10 + i}", "m", "n", "v", "r") for i in (1, 2)]
    return state


def test_certificates_chain_to_the_lab_ca_and_match_their_keys(tmp_path):
    state = lab_state(tmp_path)
    root = pki.issue(state)
    store = Store([x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())])
    for host in state.hosts:
        cert = x509.load_pem_x509_certificate((root / f"{host.name}.pem").read_bytes())
        for name in (x509.DNSName(host.name), x509.IPAddress(ipaddress.ip_address(host.ip))):
            verifier = PolicyBuilder().store(store).build_server_verifier(name)
            verifier.verify(cert, [])
        context = server_context(TLSSettings(cert_file=root / f"{host.name}.pem", key_file=root / f"{host.name}.key"))
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert (root / f"{host.name}.key").stat().st_mode & 0o777 == 0o600
        assert (root / f"{host.name}.bundle.pem").read_bytes().count(b"-----BEGIN") == 2
    assert root.stat().st_mode & 0o777 == 0o700


def test_tokens_verify_against_the_jwks_and_the_policy_loads(tmp_path):
    root = pki.issue(lab_state(tmp_path))
    verifier = TokenVerifier(root / "jwks.json", pki.ISSUER, pki.AUDIENCE, "roles", 30)
    policy = Policy.load(root / "policy.yaml")
    for role in ("inference_user", "model_admin", "auditor", "lab_load"):
        principal = verifier.verify("Bearer " + (root / "tokens" / f"{role}.jwt").read_text())
        assert principal.roles == {role} and principal.subject == f"lab-{role}"
    assert policy.authorize(verifier.verify("Bearer " + (root / "tokens" / "inference_user.jwt").read_text()),
                            "models/tiny-qwen2", "predict", None).allowed
    assert not verifier.verify("Bearer " + (root / "tokens" / "no_role.jwt").read_text()).roles
    assert policy.rate_limit(frozenset({"lab_load"}), 100) == 6000


def test_issue_again_keeps_the_ca_and_the_issuer(tmp_path):
    state = lab_state(tmp_path)
    root = pki.issue(state)
    ca, jwks = (root / "ca.pem").read_bytes(), (root / "jwks.json").read_text()
    pki.issue(state)
    assert (root / "ca.pem").read_bytes() == ca and (root / "jwks.json").read_text() == jwks


def test_the_inventory_turns_everything_on(tmp_path):
    from lab import inventory

    state = lab_state(tmp_path)
    lab_vars = inventory.render(state)["all"]["children"]["gpu_nodes"]["hosts"]["lab-2"]
    assert lab_vars["deepfleet_tls"] and lab_vars["loadbalancer_tls"] and not lab_vars["loadbalancer_http"]
    assert lab_vars["inference_runtime_jwks_src"].endswith("pki/jwks.json")
    assert lab_vars["inference_runtime_trusted_proxies"] == ["10.77.9.11/32"]  # the load balancer only


def test_weights_key_is_made_once_private_and_handed_to_the_hosts(tmp_path):
    state = lab_state(tmp_path)
    path = pki.weights_key(state)
    key = bytes.fromhex(path.read_text().strip())
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert pki.weights_key(state).read_text() == path.read_text()  # not replaced: the revisions need it
    host_vars = pki.security_vars(state)
    assert host_vars["inference_runtime_pkcs11"] is True
    assert host_vars["inference_runtime_pkcs11_data_key_src"] == str(path)
