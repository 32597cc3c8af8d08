"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter
{lora_name}. The engine loads between two steps (other requests keep being served); a loaded adapter is listed in
/v1/models with the base model as `parent` and is selected by a request's `model`. With authentication on, the
middleware lets only principals with the deploy (load) or delete (unload) right on the model through
(server/auth/actions.py: model_admin's rights). Answers as vLLM's: 200 with a plain-text line; errors as
OpenAI's error body naming the field."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from deepfleet.server import protocol as p
from deepfleet.server.async_engine import EngineDead
from deepfleet.server.engine_loop import LoadAdapter, UnloadAdapter
from deepfleet.server.errors import APIError, bad_request
from deepfleet.server.openapi_errors import WHY
from deepfleet.server.request_body import parse_as, read_json
from deepfleet.server.state import ServerState

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"

router = APIRouter()


def _responses(not_found: str | None) -> dict:
    docs = {
        200: {"description": "Done: one line of text, as vLLM answers.",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        400: {"model": p.ErrorResponse, "description": "LoRA is off, the name is taken or is the base model's, "
              "or the adapter cannot be served: missing file, rank above max_lora_rank, "
              "a module other than q/k/v/o/gate/up/down_proj, another base model's shapes (`error.message` says "
              "which)."},
        413: {"model": p.ErrorResponse, "description": WHY[413]},
        500: {"model": p.ErrorResponse, "description": WHY[500]},
        503: {"model": p.ErrorResponse, "description": WHY[503]},
    }
    if not_found:
        docs[404] = {"model": p.ErrorResponse, "description": not_found}
    return docs


def _body_doc(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _call(state: ServerState, command: LoadAdapter | UnloadAdapter, param: str) -> None:
    try:
        await state.engine.adapter(command)
    except ValueError as exc:
        raise bad_request(str(exc), param=param) from None
    except EngineDead as exc:
        raise APIError(503, f"engine unavailable: {exc}", type="server_error", code="engine_unavailable") from None


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.post(LOAD, summary="Load a LoRA adapter (vLLM)", response_class=PlainTextResponse,
             responses=_responses(None), openapi_extra=_body_doc(p.LoadLoRAAdapterRequest))
async def load_lora_adapter(request: Request) -> PlainTextResponse:
    state = _state(request)
    body = parse_as(p.LoadLoRAAdapterRequest, await read_json(request, state.settings.max_body_bytes))
    state.check_accepting()
    if not state.lora_enabled:
        raise bad_request("lora_name: LoRA is off on this server (start it with --enable-lora or --lora-modules)",
                          param="lora_name")
    if body.lora_name == state.model_name:
        raise bad_request(f"lora_name: {body.lora_name!r} is the base model's name", param="lora_name")
    if body.lora_name in state.lora_adapters:
        raise bad_request(f"lora_name: {body.lora_name!r} is already loaded (from "
                          f"{state.lora_adapters[body.lora_name]})", param="lora_name")
    await _call(state, LoadAdapter("", body.lora_name, body.lora_path), "lora_path")
    state.lora_adapters[body.lora_name] = body.lora_path
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(UNLOAD, summary="Unload a LoRA adapter (vLLM)", response_class=PlainTextResponse,
             responses=_responses("`lora_name` is not a loaded adapter."),
             openapi_extra=_body_doc(p.UnloadLoRAAdapterRequest))
async def unload_lora_adapter(request: Request) -> PlainTextResponse:
    state = _state(request)
    body = parse_as(p.UnloadLoRAAdapterRequest, await read_json(request, state.settings.max_body_bytes))
    state.check_accepting()
    if body.lora_name not in state.lora_adapters:
        loaded = ", ".join(sorted(state.lora_adapters)) or "none"
        raise APIError(404, f"lora_name: {body.lora_name!r} is not a loaded LoRA adapter (loaded: {loaded})",
                       param="lora_name", code="model_not_found")
    await _call(state, UnloadAdapter("", body.lora_name), "lora_name")
    del state.lora_adapters[body.lora_name]
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
