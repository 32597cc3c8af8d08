"""Reading a request body defensively: size limit before and while reading, strict UTF-8, strict JSON, then
pydantic validation; every failure is a 4xx naming the problem (and the field, where there is one)."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from deepfleet.server.errors import APIError, bad_request, from_validation_error

M = TypeVar("M", bound=BaseModel)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes", code="body_too_large")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise _too_large(max_bytes) if declared.isdigit() else bad_request("invalid Content-Length header")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise _too_large(max_bytes)
    except ClientDisconnect:  # gone before sending the whole body: nobody to answer
        raise APIError(499, "client closed the connection while sending the body", code="client_closed") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})",
                          code="invalid_json") from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, over-long integers, absurd nesting
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(text):
        try:  # a lone surrogate escape ("\ud800") decodes to a str no tokenizer can take
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("request body holds an unpaired UTF-16 surrogate escape", code="invalid_utf8") from None
    return data


def parse_as(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
