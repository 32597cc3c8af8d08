"""Errors in OpenAI's body shape: `{"error": {"message", "type", "param", "code"}}`, with the offending
request field in `param` so a client can tell what to fix."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from deepfleet.server.protocol import ErrorDetail, ErrorResponse

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.+)$", re.S)


class APIError(Exception):
    """An error the server answers with; raised anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            ErrorResponse(error=self.detail).model_dump(), status_code=self.status, headers=self.headers
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(status: int, message: str, code: str, retry_after_s: int) -> APIError:
    return APIError(status, message, type="overloaded_error", code=code, headers={"Retry-After": str(retry_after_s)})


def _is_field(part: object) -> bool:
    # pydantic puts union-member tags ("str", "list[TextPart]", "function-after[...]") into error locations;
    # field names here are all lower-case identifiers.
    return isinstance(part, int) or (
        isinstance(part, str) and part.isidentifier() and part.islower() and part not in {"str", "int", "float", "bool"}
    )


def field_path(loc: tuple) -> str | None:
    path = ""
    for part in loc:
        if not _is_field(part):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or None


def from_validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False, include_input=False)
    # Of a union's alternatives, the deepest error is the most telling ("content[0].type" over "content"), and
    # a wrong value tells more than the unknown keys that come with it.
    top = errors[0]["loc"][:1]
    first = max(
        (e for e in errors if e["loc"][:1] == top),
        key=lambda e: (sum(map(_is_field, e["loc"])), e["type"] != "extra_forbidden"),
    )
    param = field_path(tuple(first["loc"]))
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field (not part of the API this server implements)"
    elif first["type"] == "missing":
        msg = "field required"
    # Root-level validators name their field as "field: why".
    match = _FIELD_PREFIX.match(msg)
    if match:
        param = match.group(1) if param is None else f"{param}.{match.group(1)}"
        msg = match.group(2)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return bad_request(f"{param}: {msg}{more}" if param else f"{msg}{more}", param=param)


def from_value_error(exc: ValueError, rename: dict[str, str] | None = None) -> APIError:
    """An engine/SamplingParams ValueError("<field>: <why>") as a 400 naming the API field."""
    text = str(exc)
    match = _FIELD_PREFIX.match(text)
    if not match:
        return bad_request(text)
    param = (rename or {}).get(match.group(1), match.group(1))
    return bad_request(f"{param}: {match.group(2)}", param=param)
