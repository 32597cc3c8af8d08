"""The standalone ASGI app behind `deepfleet serve-models`: KServe v2 routes, /metrics, JSON errors for
every path (unknown routes and methods included), models loaded at startup and released at shutdown."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from deepfleet.batching.kserve import DEFAULT_MAX_BODY_BYTES, error_response, make_router
from deepfleet.batching.service import ModelService


def create_app(service: ModelService, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="deepfleet model server (KServe v2)", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(make_router(service, max_body_bytes))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        return error_response(400, ".".join(str(p) for p in first["loc"]) + ": " + first["msg"])

    return app


def create_app_from_repository(root: Path, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    return create_app(ModelService.from_repository(root), max_body_bytes)
