"""The security middleware (plain ASGI, so streaming responses and disconnects pass through untouched):

  auth off: /admin/* refused (403), everything else passed on
  open route (/healthz, /readyz, /metrics unless protected) -> passed on
  auth on:  token verified (401 + AUTH_FAILED) -> rate limit per subject (429 + RATE_LIMITED)
            -> policy decision for the route's action on models/<served name> (403 + ACCESS_DENIED)
  every response: X-RateLimit-* headers for authenticated requests; 400/413 answers audited as ABNORMAL_REQUEST.
The verified principal is left in `request.state.principal` for the routes that audit what they change."""

from __future__ import annotations

import json
from typing import Any

from deepfleet.server.auth.actions import ADMIN_PREFIX, METRICS, OPEN, action_for
from deepfleet.server.auth.errors import admin_disabled, forbidden, rate_limited, unauthenticated
from deepfleet.server.auth.guard import Guard
from deepfleet.server.auth.tokens import AuthError

ABNORMAL = {400: "malformed or invalid request", 413: "request body too large", 431: "headers too large"}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == name), None)


class SecurityMiddleware:
    def __init__(self, app: Any, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard, path = self.guard, scope["path"]
        ip = guard.client_ip(scope)
        if not guard.enabled and path.startswith(ADMIN_PREFIX):
            await admin_disabled(path).response()(scope, receive, send)
            return
        if path in OPEN or (path == METRICS and not guard.settings.protect_metrics) or not guard.enabled:
            await self.app(scope, receive, self._observing(send, scope, None, ip, {}))
            return
        audit = guard.audit
        try:
            principal = guard.verifier.verify(_header(scope, b"authorization"))
        except AuthError as e:
            audit.event("AUTH_FAILED", ip=ip, model_id=guard.model_name, path=path, reason=e.reason)
            await unauthenticated(e.reason).response()(scope, receive, send)
            return
        user = principal.subject
        rate = guard.limiter.hit(user, guard.policy.rate_limit(principal.roles, guard.settings.rate_limit_per_minute))
        headers = rate.headers()
        if not rate.allowed:
            audit.event("RATE_LIMITED", user=user, ip=ip, model_id=guard.model_name, path=path,
                        limit_per_minute=rate.limit)
            await rate_limited(rate.limit, rate.retry_after_s, headers).response()(scope, receive, send)
            return
        if path != METRICS:
            action = action_for(path)
            decision = guard.policy.authorize(principal, guard.resource, action, ip)
            if not decision.allowed:
                audit.event("ACCESS_DENIED", user=user, ip=ip, model_id=guard.model_name, path=path,
                            action=action, resource=guard.resource, roles=sorted(principal.roles),
                            reason=decision.reason)
                await forbidden(action, guard.resource, decision.reason, headers).response()(scope, receive, send)
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, self._observing(send, scope, user, ip, headers))

    def _observing(self, send: Any, scope: dict[str, Any], user: str | None, ip: str | None,
                   headers: dict[str, str]) -> Any:
        """`send` with the rate-limit headers added, auditing 400/413 answers with their error code."""
        status = 0
        body = b""

        async def wrapped(message: dict[str, Any]) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
                if headers:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      *((k.lower().encode(), v.encode()) for k, v in headers.items())]}
            elif message["type"] == "http.response.body" and status in ABNORMAL:
                body += message.get("body", b"")
                if not message.get("more_body"):
                    self._abnormal(scope, user, ip, status, body)
            await send(message)

        return wrapped

    def _abnormal(self, scope: dict[str, Any], user: str | None, ip: str | None, status: int, body: bytes) -> None:
        try:
            code = json.loads(body)["error"]["code"]  # a fixed word (invalid_json, body_too_large), never input
        except (ValueError, KeyError, TypeError):
            code = None
        self.guard.audit.event("ABNORMAL_REQUEST", user=user, ip=ip, model_id=self.guard.model_name,
                               path=scope["path"], status=status, code=code if isinstance(code, str) else None,
                               reason=ABNORMAL[status])
