"""The `auth.*` and `audit.*` settings of `deepfleet serve` (fixed names: operators, roles and tests rely on them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deepfleet import defaults


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jwks_file: Path | None = Field(
        None, description="JWKS file of the token issuer's public keys (RS256/ES256; oct keys for HS256 labs); "
        "set = authentication on for every route but /healthz, /readyz (and /metrics unless protected)."
    )
    issuer: str | None = Field(None, description="Required `iss` of tokens (unset: not checked).")
    audience: str | None = Field(None, description="Required `aud` of tokens (unset: tokens with an aud refused).")
    policy_file: Path | None = Field(
        None, description="RBAC/ABAC policy (YAML: roles with resource/actions policies, conditions, rate limits); "
        "required when auth is on."
    )
    roles_claim: str = Field("roles", description="Token claim holding the principal's roles (list or string).")
    leeway_s: float = Field(30.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat, seconds.")
    protect_metrics: bool = Field(False, description="Require a token (any valid principal) for /metrics.")
    rate_limit_per_minute: int = Field(
        defaults.RATE_LIMIT_PER_MINUTE, ge=1, description="Requests per minute per principal (token subject); "
        "the policy's rate_limits override it per role."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Networks of load balancers whose X-Forwarded-For names the client "
        "address used by ABAC source-network rules and the audit log (empty: the peer address)."
    )

    @property
    def enabled(self) -> bool:
        return self.jwks_file is not None


class AuditSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(
        None, description="JSON-lines audit log (created mode 0640); unset = audit events go to the server log."
    )
    max_bytes: int | None = Field(
        None, ge=4096, description="Rotate the log itself before a line would take it past this size (for hosts "
        "without logrotate, e.g. a pod's emptyDir); unset = never (rotation by logrotate is detected either way)."
    )
    backups: int = Field(
        defaults.AUDIT_BACKUPS, ge=1, description="Rotated files kept by max_bytes rotation (path.1 newest); the "
        "log takes at most (backups + 1) x max_bytes."
    )
