"""The FastAPI application: OpenAI routes, health (/healthz, also as vLLM's /health; /readyz), /metrics, and
OpenAI-shaped errors for everything that goes wrong, including routing errors and bugs (never a bare 500 page)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfleet import __version__
from deepfleet.server import protocol
from deepfleet.server.auth import admin
from deepfleet.server.auth import openapi as auth_openapi
from deepfleet.server.auth.guard import Guard
from deepfleet.server.auth.middleware import SecurityMiddleware
from deepfleet.server.config import ServeSettings
from deepfleet.server.errors import APIError, bad_request
from deepfleet.server.lora_api import router as lora_router
from deepfleet.server.openai_api import REF_TEMPLATE
from deepfleet.server.openai_api import router as openai_router
from deepfleet.server.openapi_errors import probe
from deepfleet.server.state import ServerState

log = logging.getLogger(__name__)


def build_engine(settings: ServeSettings) -> Any:
    """The real engine for `settings` (imported here: torch loads only when a server starts)."""
    from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
    from deepfleet.security.serving import model_source

    with model_source(settings.model, settings.weights) as model_dir:  # an encrypted model: decrypted in memory
        return LLMEngine(EngineConfig(model=str(model_dir), **settings.engine.engine_kwargs()))


def _record(request: Request, status: int) -> None:
    record = getattr(request.state, "record", None)
    if record is not None:
        record.done(status)


async def _start_audited(state: ServerState, guard: Guard) -> None:
    await state.start()
    if state.peer is not None and state.peer.index > 0:  # several API processes: the first one tells
        return
    if state.phase == "failed":
        guard.audit.event("MODEL_LOAD_FAILED", model_id=state.model_name, reason=state.error, trigger="start")
    else:
        guard.audit.event("MODEL_LOADED", model_id=state.model_name, trigger="start",
                          auth="on" if guard.enabled else "off")


def _parameter_error(exc: RequestValidationError) -> APIError:
    """A query or path parameter FastAPI refused (the admin routes'): 400 in OpenAI's shape, not FastAPI's 422."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    return bad_request(f"{param}: {first['msg']}" if param else str(first["msg"]), param=param,
                       code="invalid_parameter")


def _parameter_errors(doc: dict[str, Any]) -> dict[str, Any]:
    """The document says 400 where FastAPI would list its 422 (see _parameter_error)."""
    for item in doc.get("paths", {}).values():
        for op in item.values():
            if isinstance(op, dict) and op.get("responses", {}).pop("422", None) is not None:
                op["responses"].setdefault("400", {
                    "description": "A query or path parameter of the wrong type or out of range (invalid_parameter; "
                                   "`error.param` names it).",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
    schemas = doc.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return doc


def create_app(settings: ServeSettings, engine_factory: Callable[[ServeSettings], Any] = build_engine,
               peer: Any = None) -> FastAPI:
    """`peer` (api_processes.Peer): this app is one of several API processes in front of a shared engine."""
    state = ServerState(settings, engine_factory, peer)
    guard = Guard(settings)  # reads and checks JWKS, policy and audit path: a bad one stops the start here

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /healthz answers at once, /readyz once the model is loaded and warm.
        loading = asyncio.create_task(_start_audited(state, guard))
        yield
        loading.cancel()
        await state.stop()
        guard.audit.close()

    app = FastAPI(title="deepfleet", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible inference for DeepSeek-family models.")
    app.state.server = state
    app.state.guard = guard
    app.include_router(openai_router)
    app.include_router(lora_router)
    app.include_router(admin.router)  # refused by the middleware unless auth is on
    app.add_middleware(SecurityMiddleware, guard=guard)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = default_openapi()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in protocol.DOCUMENTED_REQUESTS:
                schemas.update(model.model_json_schema(ref_template=REF_TEMPLATE).get("$defs", {}))
            app.openapi_schema = auth_openapi.document(_parameter_errors(doc))  # + the middleware's 401/403/429
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/healthz", summary="Liveness: the process and its engine loop are alive",
             responses=probe("Loading failed or the engine died (`error` says why): restart."))
    @app.get("/health", summary="Liveness, under vLLM's path (probes written for vLLM): the same as /healthz",
             responses=probe("Loading failed or the engine died (`error` says why): restart."))
    async def healthz() -> JSONResponse:
        if not state.alive:
            return JSONResponse({"status": "failed", "error": state.error or str(state.engine.dead)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Readiness: model loaded and warmed up, not draining",
             responses=probe("loading, warming_up, draining or failed (`status`)."))
    async def readyz() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        phase = "draining" if state.draining else ("failed" if not state.alive else state.phase)
        return JSONResponse({"status": phase}, 503)

    @app.get("/version", summary="The server's version (vLLM's route)")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        _record(request, exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def parameter_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _parameter_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        _record(request, 500)
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    return app
