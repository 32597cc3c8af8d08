"""Test key material made here with `cryptography` and PyJWT: an issuer's RSA and EC keys (plus an HS256 secret)
published as a JWKS file, tokens signed with them, a policy file in the documents' shape, and a CA with server
and client certificates for TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ISSUER = "https://issuer.test"
AUDIENCE = "deepfleet-test"
HS_SECRET = b"lab-hs256-secret-of-32-bytes-abc"

POLICY = """\
roles:
  - name: model_admin
    policies:
      - resource: "models/*"
        actions: [deploy, update, delete]
  - name: inference_user
    policies:
      - resource: "models/tiny*"
        actions: [predict]
  - name: ml_only
    policies:
      - resource: "models/*"
        actions: [predict]
        conditions:
          claims: {department: [ml]}
  - name: office_network
    policies:
      - resource: "models/*"
        actions: [predict]
        conditions:
          source_networks: [10.0.0.0/8]
  - name: bulk
    rate_limit_per_minute: 100000
    policies:
      - resource: "models/*"
        actions: [predict]
  - name: admin
    policies:
      - resource: "*"
        actions: ["*"]
  - name: engineer
    policies:
      - resource: "models/*"
        actions: [predict, update]
  - name: auditor
    policies:
      - resource: "models/*"
        actions: [read_logs]
"""


class Issuer:
    """Signing keys and their JWKS; `token()` issues a valid token unless told otherwise."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # a forger's key

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        hs_jwk = json.loads(jwt.algorithms.HMACAlgorithm.to_jwk(HS_SECRET))
        return {"keys": [{**rsa_jwk, "kid": "rsa-1", "use": "sig"}, {**ec_jwk, "kid": "ec-1", "use": "sig"},
                         {**hs_jwk, "kid": "hs-1", "alg": "HS256"}]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(self, sub: str = "alice", roles: list[str] | None = None, kid: str = "rsa-1", lifetime: int = 300,
              **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + lifetime,
                   "roles": ["inference_user"] if roles is None else roles, **claims}
        payload = {k: v for k, v in payload.items() if v is not None}
        key, alg = {"rsa-1": (self.rsa, "RS256"), "ec-1": (self.ec, "ES256"), "hs-1": (HS_SECRET, "HS256")}.get(
            kid, (self.rsa, "RS256"))
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})

    def forged(self, **claims: Any) -> str:
        """Claims as a valid token, kid of the real key, signed with another key."""
        now = int(time.time())
        payload = {"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "roles": ["admin"], **claims}
        return jwt.encode(payload, self.other_rsa, algorithm="RS256", headers={"kid": "rsa-1"})


def auth_settings(tmp: Path, issuer: Issuer, policy: str = POLICY) -> dict[str, Any]:
    (tmp / "policy.yaml").write_text(policy)
    return {"auth": {"jwks_file": str(issuer.write_jwks(tmp / "jwks.json")), "issuer": ISSUER, "audience": AUDIENCE,
                     "policy_file": str(tmp / "policy.yaml")},
            "audit": {"path": str(tmp / "audit.jsonl")}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- TLS: a CA and certificates it signs ---------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: Any, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("deepfleet test CA")).issuer_name(_name("deepfleet test CA"))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = tmp / "ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, server: bool = True) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file = self.tmp / f"{name}.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, _write_key(key, self.tmp / f"{name}.key")
