"""JWT verification with PyJWT against a JWKS file: the key is chosen by the token's `kid`, the algorithm by that
key (RSA -> RS256, EC P-256 -> ES256, oct -> HS256, or the key's own `alg`), so a token can never pick a weaker
algorithm than its key (no alg=none, no RS256 public key used as an HMAC secret). exp/nbf/iat are checked with a
small leeway, `iss` and `aud` when configured."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from deepfleet.security.errors import SecurityConfigError

ALLOWED_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "HS256"}


class AuthError(Exception):
    """A request is not authenticated; `reason` is safe to log and to answer with (no token material in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset[str]
    claims: dict[str, Any] = field(repr=False)


def load_jwks(path: Path) -> dict[str, jwt.PyJWK]:
    """kid -> key. Every key must have a unique `kid` and an allowed algorithm."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise SecurityConfigError(f"auth.jwks_file {path}: {e.strerror}") from None
    except ValueError as e:
        raise SecurityConfigError(f"auth.jwks_file {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise SecurityConfigError(f"auth.jwks_file {path}: keys: must be a non-empty list of JWKs")
    keys: dict[str, jwt.PyJWK] = {}
    for i, entry in enumerate(data["keys"]):
        where = f"auth.jwks_file {path}: keys[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str) or not entry["kid"]:
            raise SecurityConfigError(f"{where}.kid: required (tokens name their key by kid)")
        if entry["kid"] in keys:
            raise SecurityConfigError(f"{where}.kid: {entry['kid']!r} appears twice")
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            raise SecurityConfigError(f"{where}: not a usable key ({e})") from None
        if key.algorithm_name not in ALLOWED_ALGORITHMS:
            allowed = ", ".join(sorted(ALLOWED_ALGORITHMS))
            raise SecurityConfigError(f"{where}.alg: {key.algorithm_name} is not allowed ({allowed})")
        keys[entry["kid"]] = key
    return keys


def _roles(claims: dict[str, Any], claim: str) -> frozenset[str]:
    value = claims.get(claim, [])
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(r, str) for r in value):
        return frozenset(value)
    raise AuthError(f"claim {claim!r}: must be a list of role names or a space-separated string")


class TokenVerifier:
    def __init__(self, jwks_file: Path, issuer: str | None, audience: str | None, roles_claim: str,
                 leeway_s: float) -> None:
        self.keys = load_jwks(jwks_file)
        self.issuer, self.audience, self.roles_claim, self.leeway = issuer, audience, roles_claim, leeway_s

    def verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthError("missing bearer token (Authorization: Bearer <JWT>)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("Authorization header: expected 'Bearer <JWT>'")
        token = token.strip()
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError("unknown key id (kid) in token header")
        options = {"require": ["exp", "sub"], "verify_aud": self.audience is not None}
        try:
            claims = jwt.decode(token, key=key, algorithms=[key.algorithm_name], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway, options=options)
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience (aud)") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer (iss)") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm does not match its key") from None
        except jwt.InvalidSignatureError:
            raise AuthError("signature verification failed") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"token lacks required claim {e.claim!r}") from None
        except jwt.InvalidTokenError as e:
            raise AuthError(f"invalid token ({type(e).__name__})") from None
        if self.audience is None and "aud" in claims:
            raise AuthError("token has an audience (aud) but none is configured for this server")
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise AuthError("claim 'sub': must be a non-empty string")
        return Principal(subject, _roles(claims, self.roles_claim), claims)
