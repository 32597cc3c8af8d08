"""The answers of the security middleware, built in one place so the OpenAPI document shows the very bodies the
server sends (server/auth/openapi.py builds its examples with these functions)."""

from __future__ import annotations

from deepfleet.server.errors import APIError

# RFC 6750: a refused bearer token is answered with this challenge.
CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def unauthenticated(reason: str) -> APIError:
    return APIError(401, f"authentication required: {reason}", type="authentication_error", code="invalid_token",
                    headers=CHALLENGE)


def forbidden(action: str, resource: str, reason: str, headers: dict[str, str] | None = None) -> APIError:
    return APIError(403, f"{action} on {resource} denied: {reason}", type="permission_error", code="forbidden",
                    headers=headers)


def admin_disabled(path: str) -> APIError:
    return APIError(403, f"{path}: admin routes need authentication (set auth.jwks_file)", type="permission_error",
                    code="auth_disabled")


def rate_limited(limit: int, retry_after_s: int, headers: dict[str, str]) -> APIError:
    return APIError(429, f"rate limit of {limit} requests per minute exceeded; retry in {retry_after_s} s",
                    type="rate_limit_error", code="rate_limit_exceeded", headers=headers)
