"""The error responses each operation really sends, for the OpenAPI document (FastAPI's `responses=`): every
status with OpenAI's error body and what causes it. Routes list the statuses they can answer; the security
middleware's 401/403/429 are added to every operation it guards by server/auth/openapi.py."""

from __future__ import annotations

from typing import Any

from deepfleet.server.protocol import ErrorResponse

WHY = {
    400: "Invalid request: malformed JSON or UTF-8, unknown field, wrong type, value out of range, a constraint "
         "the schema states (e.g. a user message needs content) or one only the server can check (prompt beyond "
         "the context, token ids beyond the vocabulary, a schema or grammar that cannot be compiled in time, a "
         "tool_choice naming an undefined tool). `error.param` names the field.",
    404: "`model` is not the served model.",
    413: "Request body larger than max_body_bytes.",
    429: "Admission queue full; see Retry-After.",
    500: "Internal error (also an engine failure after a stream started, as an SSE error event).",
    503: "Not ready (loading, warming up), draining after SIGTERM, no slot within the request timeout, every "
         "LoRA adapter slot serving unfinished requests while `model` names an adapter that holds none, or the "
         "engine died; Retry-After where retrying helps.",
}

INFERENCE = (400, 404, 413, 429, 500, 503)  # the generation routes
TOKENIZER = (400, 404, 413, 500, 503)  # /tokenize, /detokenize: no admission queue


def responses(statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": WHY[status]} for status in statuses}


STATUS_BODY = {"type": "object", "properties": {"status": {"type": "string"}, "error": {"type": "string"}},
               "required": ["status"]}


def probe(why: str) -> dict[int | str, dict[str, Any]]:
    """/healthz, /readyz: 503 with their own small body."""
    return {503: {"description": why, "content": {"application/json": {"schema": STATUS_BODY}}}}


def streaming_200() -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or an SSE stream of chunks with `"stream": true`."""
    return {200: {"description": "The completion (JSON), or with `stream: true` an SSE stream of `data: {chunk}` "
                                 "events ending with `data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
