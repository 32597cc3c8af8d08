"""A request's output constraint as plain data: built and checked in the (torch-free) server process, carried to
the engine inside SamplingParams, compiled there. `key` identifies the compiled grammar in the caches."""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    kind: str  # one of KINDS
    spec: str  # json_schema: the schema as JSON text; regex/grammar (EBNF): the source; choice: a JSON list
    field: str  # the request field it came from, named in errors ("response_format", "guided_regex", ...)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.field}: unknown structured output kind {self.kind!r}")

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.spec

    @staticmethod
    def json_schema(schema: dict, field: str) -> StructuredOutput:
        return StructuredOutput("json_schema", json.dumps(schema, sort_keys=True), field)

    @staticmethod
    def choice(options: list[str], field: str) -> StructuredOutput:
        return StructuredOutput("choice", json.dumps(options), field)
