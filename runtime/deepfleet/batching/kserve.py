"""KServe v2 / Open Inference Protocol over HTTP (the REST convention Triton and KServe share):

    GET  /v2/health/live            GET /v2/health/ready          GET /v2
    GET  /v2/models/{name}          GET /v2/models/{name}/ready   POST /v2/models/{name}/infer
    (and the same under /v2/models/{name}/versions/{version}/..., for the configured version only)

Errors are `{"error": "<field>: <message>"}` with a 4xx status for anything the client got wrong (400
bad body, 404 unknown model, 413 oversize body), 503 when a queue is full or a model is not ready, 504
when the request's deadline passed. A 500 means the backend itself failed on a valid request."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from deepfleet import __version__
from deepfleet.batching import protocol
from deepfleet.batching.errors import BatchingError, InvalidInput, PayloadTooLarge
from deepfleet.batching.service import ModelService

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class _JSON(JSONResponse):
    # Model outputs may hold inf/NaN; Python's JSON spelling of them beats failing the response.
    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=True, separators=(",", ":")).encode()


def error_response(status: int, message: str) -> _JSON:
    return _JSON({"error": message}, status_code=status)


async def read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body: {declared} bytes exceed the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body: more than the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidInput("body", f"malformed JSON: {exc}") from None


def make_router(service: ModelService, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> APIRouter:
    router = APIRouter(prefix="/v2")

    @router.get("")
    async def server_metadata() -> Response:
        return _JSON({"name": "deepfleet", "version": __version__, "extensions": ["schedule_policy"]})

    @router.get("/health/live")
    async def live() -> Response:
        return _JSON({"live": True})

    @router.get("/health/ready")
    async def ready() -> Response:
        return _JSON({"ready": service.ready}, status_code=200 if service.ready else 503)

    @router.get("/models/{name}")
    @router.get("/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        try:
            config = service.get(name, version).config
        except BatchingError as exc:
            return error_response(exc.status, exc.message)
        return _JSON({
            "name": config.name, "versions": [config.version], "platform": config.backend,
            "inputs": protocol.tensor_metadata(config, "inputs"),
            "outputs": protocol.tensor_metadata(config, "outputs"),
            "parameters": {"max_batch_size": config.max_batch_size, "max_queue_delay_ms": config.max_queue_delay_ms},
        })

    @router.get("/models/{name}/ready")
    @router.get("/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        try:
            model = service.get(name, version)
        except BatchingError as exc:
            return error_response(exc.status, exc.message)
        return _JSON({"name": name, "ready": model.ready}, status_code=200 if model.ready else 503)

    @router.post("/models/{name}/infer")
    @router.post("/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        try:
            service.get(name, version)  # unknown model or version: 404 before reading the body
            body = await read_json(request, max_body_bytes)
            return _JSON(await service.infer(name, body))
        except BatchingError as exc:
            return error_response(exc.status, exc.message)
        except Exception as exc:  # the backend failed on a request that passed validation
            log.exception("inference on model %s failed", name)
            return error_response(500, f"inference failed: {type(exc).__name__}: {exc}")

    return router
