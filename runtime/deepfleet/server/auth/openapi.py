"""What the security middleware adds to the OpenAPI document: the bearer-JWT scheme, and on every operation it
guards the 401, 403 and 429 it answers with, their headers, and example bodies made by the functions that make
the real ones (server/auth/errors.py). The document is the same whether or not a server has authentication on
(clients generated from it work against both); the descriptions say when each answer comes."""

from __future__ import annotations

from typing import Any

from deepfleet.server.auth.actions import ADMIN_PREFIX, METRICS, OPEN, action_for
from deepfleet.server.auth.errors import admin_disabled, forbidden, rate_limited, unauthenticated
from deepfleet.server.auth.policy import Policy, PolicyDocument
from deepfleet.server.auth.ratelimit import RateDecision
from deepfleet.server.auth.tokens import Principal
from deepfleet.server.errors import APIError
from deepfleet.server.protocol import ErrorResponse

SCHEME = "bearerJWT"
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
INTEGER = {"schema": {"type": "integer"}}
RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "Requests per minute allowed to this principal.", **INTEGER},
    "X-RateLimit-Remaining": {"description": "Requests left in the bucket now.", **INTEGER},
    "X-RateLimit-Reset": {"description": "Seconds until the bucket is full again.", **INTEGER},
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds until the next request is allowed.", **INTEGER}}
CHALLENGE = {"WWW-Authenticate": {"description": 'Bearer error="invalid_token" (RFC 6750).',
                                  "schema": {"type": "string"}}}
_REFUSED = RateDecision(allowed=False, limit=100, remaining=0, reset_s=60, retry_after_s=1)
_NO_ROLES = Policy(PolicyDocument.model_construct(roles=[]), "example"), Principal("someone", frozenset(), {})


def _examples(**errors: APIError) -> dict[str, Any]:
    return {name: {"summary": e.detail.code, "value": ErrorResponse(error=e.detail).model_dump()}
            for name, e in errors.items()}


def _response(description: str, headers: dict[str, Any], examples: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "headers": dict(headers),
            "content": {"application/json": {"schema": ERROR_REF, "examples": examples}}}


def _add(responses: dict[str, Any], status: int, new: dict[str, Any]) -> None:
    """Adds `new` to the operation's answers; a status it documents already (429 of the admission queue) keeps
    its description first and gains the headers and examples."""
    old = responses.get(str(status))
    if old is None:
        responses[str(status)] = new
        return
    old["description"] = f"{old['description']} {new['description']}"
    old.setdefault("headers", {}).update(new["headers"])
    media = old.setdefault("content", {}).setdefault("application/json", {"schema": ERROR_REF})
    media.setdefault("examples", {}).update(new["content"]["application/json"]["examples"])


def _guard(path: str, op: dict[str, Any]) -> None:
    admin = path.startswith(ADMIN_PREFIX)
    when = ("With auth.protect_metrics on: " if path == METRICS
            else "" if admin else "With authentication on (auth.jwks_file): ")
    action = action_for(path.replace("{", "").replace("}", ""))
    resource = "models/<served name>"
    responses = op.setdefault("responses", {})
    # admin routes need a token always (403 auth_disabled without auth); the others only where auth is on
    op["security"] = [{SCHEME: []}] if admin else [{SCHEME: []}, {}]
    _add(responses, 401, _response(
        f"{when}no valid bearer token: missing, malformed, expired, not yet valid, wrong issuer or audience, "
        "unknown key id, bad signature (`error.message` says which). Audited as AUTH_FAILED.", CHALLENGE,
        _examples(missing_token=unauthenticated("missing bearer token (Authorization: Bearer <JWT>)"),
                  expired=unauthenticated("token expired"))))
    policy, nobody = _NO_ROLES
    reason = policy.authorize(nobody, resource, action, None).reason
    denied = {"forbidden": forbidden(action, resource, reason, RATE_HEADERS)}
    if admin:
        denied["auth_disabled"] = admin_disabled(path)
    _add(responses, 403, _response(
        f"{when}the token's roles (auth.policy_file, with its attribute conditions) do not grant `{action}` on "
        f"{resource}. Audited as ACCESS_DENIED."
        + (" Without authentication every admin route answers 403 auth_disabled." if admin else ""),
        RATE_HEADERS, _examples(**denied)))
    _add(responses, 429, _response(
        f"{when}the principal's rate limit (token bucket per `sub`; auth.rate_limit_per_minute or its role's "
        "rate_limit_per_minute) is spent. Audited as RATE_LIMITED.", {**RETRY_AFTER, **RATE_HEADERS},
        _examples(rate_limited=rate_limited(_REFUSED.limit, _REFUSED.retry_after_s, _REFUSED.headers()))))
    for status, answer in responses.items():  # every answer to an authenticated request carries the bucket
        if status != "401":
            answer.setdefault("headers", {}).update(
                {k: v for k, v in RATE_HEADERS.items() if k not in answer["headers"]})


def document(doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    if "ErrorResponse" not in schemas:
        schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}), ErrorResponse=schema)
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "A JWT signed by a key of auth.jwks_file (RS256/PS256/ES256, HS256 for labs), with exp "
                       "and sub, iss/aud as configured; roles from the auth.roles_claim claim."}
    for path, item in doc.get("paths", {}).items():
        if path in OPEN:
            continue
        for method in METHODS:
            if method in item:
                _guard(path, item[method])
    return doc
