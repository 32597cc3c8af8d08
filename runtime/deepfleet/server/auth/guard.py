"""Everything the security middleware and the admin routes share, built once from the settings at start-up
(every file is read and checked here, so a bad JWKS or policy stops the server before it listens)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from deepfleet.security.errors import SecurityConfigError
from deepfleet.server.auth.audit import AuditLog
from deepfleet.server.auth.policy import Policy
from deepfleet.server.auth.ratelimit import RateLimiter
from deepfleet.server.auth.tokens import TokenVerifier

log = logging.getLogger(__name__)


class Guard:
    def __init__(self, settings: Any) -> None:
        auth = settings.auth
        self.settings = auth
        self.model_name: str = settings.model_name()
        self.resource = f"models/{self.model_name}"
        self.verifier: TokenVerifier | None = None
        self.policy: Policy | None = None
        if auth.enabled:
            self.verifier = TokenVerifier(auth.jwks_file, auth.issuer, auth.audience, auth.roles_claim, auth.leeway_s)
            if auth.policy_file is None:
                raise SecurityConfigError("auth.policy_file: required when auth.jwks_file is set (who may do what)")
            self.policy = Policy.load(auth.policy_file)
        elif auth.policy_file is not None:
            raise SecurityConfigError("auth.policy_file: set without auth.jwks_file (a policy needs authenticated "
                                      "principals; set auth.jwks_file too)")
        try:
            self.proxies = [ipaddress.ip_network(n) for n in auth.trusted_proxies]
        except ValueError as e:
            raise SecurityConfigError(f"auth.trusted_proxies: {e}") from None
        self.limiter = RateLimiter()
        self.audit = AuditLog(settings.audit.path, settings.audit.max_bytes, settings.audit.backups)

    @property
    def enabled(self) -> bool:
        return self.verifier is not None

    def reload_policy(self) -> Policy:
        """Swap in the policy file's current content; on any error the old policy stays in force."""
        self.policy = Policy.load(self.settings.policy_file)
        return self.policy

    def client_ip(self, scope: dict[str, Any]) -> str | None:
        """The peer address, or, when the peer is a trusted proxy, the last untrusted X-Forwarded-For hop."""
        peer = (scope.get("client") or (None,))[0]
        if not self.proxies or peer is None or not self._trusted(peer):
            return peer
        forwarded = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"), "")
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if not self._trusted(hop):
                return hop
        return peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)


def exposure_warnings(settings: Any) -> list[str]:
    """What `deepfleet serve` shouts about: listening beyond loopback without authentication or without TLS."""
    try:
        loopback = settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return []
    where = f"{settings.host}:{settings.port}"
    warnings = []
    if not settings.auth.enabled:
        warnings.append(f"WARNING: listening on {where} WITHOUT AUTHENTICATION: anyone who reaches this port can "
                        "use the model. Set auth.jwks_file and auth.policy_file (runtime/README.md, Security).")
    if not settings.tls.enabled:
        warnings.append(f"WARNING: listening on {where} without TLS: tokens and prompts cross the network in clear "
                        "text. Set tls.cert_file and tls.key_file, or keep a TLS-terminating proxy in front.")
    return warnings
