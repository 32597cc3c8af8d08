"""Admin routes (the middleware has already checked the action: deploy/delete/update for model_admin, read_logs
for auditors): unload the served model after draining it, load it again, reload the policy, read the audit log.
Every change is audited with who made it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Query, Request

from deepfleet.security.errors import SecurityConfigError
from deepfleet.server.auth.guard import Guard
from deepfleet.server.errors import APIError
from deepfleet.server.protocol import ErrorResponse

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"])
DRAIN_POLL_S = 0.05
# The answers of these routes besides 200 (401/403/429 of the middleware: server/auth/openapi.py).
NOT_SERVED = {404: {"model": ErrorResponse, "description": "`name` is not the served model (model_not_found)."}}


def _conflict(why: str) -> dict[int | str, dict[str, Any]]:
    return {409: {"model": ErrorResponse, "description": f"{why} (conflict)."}}


def _context(request: Request) -> tuple[Guard, Any, str | None, str | None]:
    guard: Guard = request.app.state.guard
    principal = getattr(request.state, "principal", None)
    return guard, request.app.state.server, principal.subject if principal else None, guard.client_ip(request.scope)


def _served(guard: Guard, name: str) -> None:
    if name != guard.model_name:
        raise APIError(404, f"model: {name!r} is not served here (this server serves {guard.model_name!r})",
                       param="model", code="model_not_found")


async def _drain(state: Any, timeout_s: float) -> int:
    """Wait until no request is inside or queued for the engine; returns how many were still running at the end."""
    end = time.monotonic() + timeout_s
    while state.engine is not None and (state.engine.admission.active or state.engine.admission.queued):
        if time.monotonic() >= end:
            break
        await asyncio.sleep(DRAIN_POLL_S)
    return 0 if state.engine is None else state.engine.admission.active


@router.post("/models/{name}/unload", summary="Unload the served model after draining (model_admin: delete)",
             responses={**NOT_SERVED, **_conflict("The model is not ready")})
async def unload(request: Request, name: str) -> dict[str, Any]:
    guard, state, user, ip = _context(request)
    _served(guard, name)
    if state.phase != "ready":
        raise APIError(409, f"model is {state.phase}; only a ready model can be unloaded", code="conflict")
    state.phase = "unloading"  # new requests get 503 not_ready from here on; /readyz turns 503
    left = await _drain(state, state.settings.shutdown_grace_s)
    await state.stop()
    state.engine, state.phase = None, "unloaded"
    guard.audit.event("MODEL_UNLOADED", user=user, ip=ip, model_id=name, aborted_requests=left)
    return {"model": name, "status": "unloaded", "aborted_requests": left}


@router.post("/models/{name}/load", summary="Load the served model again (model_admin: deploy)",
             responses={**NOT_SERVED, **_conflict("The model is not unloaded"),
                        503: {"model": ErrorResponse, "description": "Loading failed (load_failed), and why."}})
async def load(request: Request, name: str) -> dict[str, Any]:
    guard, state, user, ip = _context(request)
    _served(guard, name)
    if state.phase != "unloaded":
        raise APIError(409, f"model is {state.phase}; only an unloaded model can be loaded", code="conflict")
    state.phase = "loading"
    await state.start()
    if state.phase != "ready":
        guard.audit.event("MODEL_LOAD_FAILED", user=user, ip=ip, model_id=name, reason=state.error)
        raise APIError(503, f"model failed to load: {state.error}", type="server_error", code="load_failed")
    guard.audit.event("MODEL_LOADED", user=user, ip=ip, model_id=name, trigger="admin")
    return {"model": name, "status": "ready"}


@router.post("/policy/reload", summary="Re-read auth.policy_file (model_admin: update)",
             responses={400: {"model": ErrorResponse,
                              "description": "The file does not parse or validate (invalid_policy); the previous "
                                             "policy stays in force."}})
async def reload_policy(request: Request) -> dict[str, Any]:
    guard, _state, user, ip = _context(request)
    try:
        policy = guard.reload_policy()
    except SecurityConfigError as e:
        guard.audit.event("POLICY_RELOAD_FAILED", user=user, ip=ip, model_id=guard.model_name, reason=str(e))
        message = f"policy not reloaded (the previous one stays in force): {e}"
        raise APIError(400, message, code="invalid_policy") from None
    guard.audit.event("POLICY_RELOADED", user=user, ip=ip, model_id=guard.model_name, **policy.summary())
    return {"status": "reloaded", **policy.summary()}


@router.get("/audit", summary="The latest audit events (auditor: read_logs)")
async def read_audit(request: Request, limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
    guard, _state, user, ip = _context(request)
    events = guard.audit.tail(limit)
    guard.audit.event("AUDIT_READ", user=user, ip=ip, model_id=guard.model_name, count=len(events))
    return {"events": events}
