"""OpenAI request and response bodies (the subset deepfleet serves), as pydantic models.

Unknown-field policy: every key of a request must be declared here, otherwise the request is refused with a
400 naming the key (`extra="forbid"`). OpenAI fields that do not change what we generate (`user`, `metadata`,
`store`, ...) are declared and ignored; fields that would need behaviour we do not have (audio, `suffix`, ...)
are accepted only with their neutral value, so a client never silently gets something other than what it asked
for. runtime/README.md lists both groups. A null for an optional field is the field left out (_SamplingFields).
"""

from __future__ import annotations

import json
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from deepfleet.engine.sampling_params import LOGIT_BIAS_RANGE, MAX_LOGPROBS
from deepfleet.structured.spec import StructuredOutput

MAX_STOP_SEQUENCES = 16
MAX_PRIORITY = 1_000_000  # |priority| bound: keeps the scheduler's keys small and sane
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI-only padding against side channels: ignored


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# roles whose messages must carry content (an assistant turn may be only tool calls)
CONTENT_ROLES = ("system", "developer", "user", "tool")


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"if": {"properties": {"role": {"enum": list(CONTENT_ROLES)}}},
         "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}},
        {"if": {"properties": {"role": {"const": "tool"}}}, "then": {"required": ["tool_call_id"]}},
    ]})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # What this server returned in an earlier turn; R1's chat template drops it from the history.
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this answers

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role in CONTENT_ROLES:
            raise ValueError("content: is required for this role")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: is required for role 'tool'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' convention: tool-call arguments as a mapping)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self


def _neutral(value: Any, neutral: tuple[Any, ...], why: str) -> Any:
    if value not in neutral:
        raise ValueError(why)
    return value


def _admits_none(annotation: Any) -> bool:
    return annotation is None or annotation is Any or type(None) in typing.get_args(annotation)


def _null_means_default(field: Any) -> bool:
    """An optional field whose type has no None: a null there stands for its default."""
    return not field.is_required() and not _admits_none(field.annotation)


def _document_null_defaults(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The JSON schema says what _null_is_default accepts: null beside the type of each field with a default."""
    for name, field in model.model_fields.items():
        prop = schema.get("properties", {}).get(name)
        if prop is None or not _null_means_default(field) or "anyOf" in prop:
            continue
        kept = {k: prop.pop(k) for k in ("default", "title", "description") if k in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **kept}


class _SamplingFields(_Strict):
    """Fields shared by both endpoints: OpenAI's plus the usual vLLM extensions.

    OpenAI's API declares its optional fields nullable, null meaning the default (and clients send explicit
    nulls): a null for a field with a default is taken as the field left out, default and generation_config.json
    defaults included, as vLLM does."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_document_null_defaults)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or not _null_means_default(fields[k])}

    model: str
    n: int = Field(1, ge=1)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's (streamed: with the first chunk)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # ignored
    # token id (as a string, as JSON keys are) -> bias
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE)]] | None = Field(
        None, json_schema_extra=lambda schema: schema["anyOf"][0].update(additionalProperties=False))
    response_format: ResponseFormat | None = None
    # Extensions (vLLM names).
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    min_tokens: int = Field(0, ge=0)
    # vLLM's guided decoding (extra_body); at most one constraint per request, response_format included
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, min_length=1)
    # Lower is more urgent; the X-Priority header sets it when the body does not.
    priority: int | None = Field(None, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("guided_json")
    @classmethod
    def _guided_json(cls, v: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
            if not isinstance(v, dict):
                raise ValueError("a JSON schema must be an object")
        return v

    @model_validator(mode="after")
    def _one_constraint(self) -> _SamplingFields:
        given = [f for f in GUIDED_FIELDS if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"{given[1]}: only one output constraint per request (also given: {given[0]})")
        return self

    def structured_output(self) -> StructuredOutput | None:
        """The output constraint, as the engine compiles it."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return StructuredOutput("json_object", "", "response_format")
        if rf is not None and rf.type == "json_schema":
            return StructuredOutput.json_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
        if self.guided_json is not None:
            return StructuredOutput.json_schema(self.guided_json, "guided_json")
        if self.guided_regex is not None:
            return StructuredOutput("regex", self.guided_regex, "guided_regex")
        if self.guided_choice is not None:
            return StructuredOutput.choice(self.guided_choice, "guided_choice")
        if self.guided_grammar is not None:
            return StructuredOutput("grammar", self.guided_grammar, "guided_grammar")
        return None

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return v

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Accepted and ignored: they do not change what is generated.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra variables for the chat template
    verbosity: str | None = None
    moderation: Any = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # Accepted only with their neutral value (legacy function calling and audio are not served).
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: list[Any] | None) -> None:
        return _neutral(v or None, (None,), "the legacy functions API is not supported: use tools")

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: Any) -> Any:
        return _neutral(v, (None, "none", "auto"), "the legacy functions API is not supported: use tool_choice")

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: names {choice.function.name!r}, which is not among the tools "
                             f"({', '.join(names) or 'none given'})")
        if choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        if self.tool_mode() in ("required", "named") and self.structured_output() is not None:
            raise ValueError("tool_choice: a forced tool call cannot be combined with another output constraint")
        return self

    def tool_mode(self) -> str:
        """none (no tool calls), auto (the model may call: parse its output), required or named (forced)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v: list[str] | None) -> list[str] | None:
        return _neutral(v, (None, ["text"]), "only ['text'] is supported")

    @field_validator("audio", "prediction", "web_search_options")
    @classmethod
    def _unsupported(cls, v: Any) -> None:
        return _neutral(v, (None,), "not supported (leave it out)")

    @model_validator(mode="after")
    def _logprob_fields(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: give max_tokens or max_completion_tokens, not both")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompts = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    # A prompt (text or token ids) or a batch of them: each gets its `n` choices, indexed prompt by prompt.
    prompt: Prompts = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> None:
        return _neutral(v or None, (None,), "suffix (insertion) is not supported")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Prompts) -> Prompts:
        for ids in (x for x in ([v] if v and isinstance(v[0], int) else v) if isinstance(x, list)):
            if not ids:
                raise ValueError("a token-id prompt must not be empty")
            if any(t < 0 for t in ids):
                raise ValueError("token ids must be >= 0")
        if isinstance(v, list) and any(isinstance(x, str) and not x for x in v):
            raise ValueError("prompts must not be empty")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def requested_max_tokens(self) -> int:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeCompletionRequest(_Strict):
    """vLLM's /tokenize for a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """vLLM's /tokenize for a conversation (formatted with the chat template, as a chat request would be)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(min_length=1)

    @field_validator("tokens")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v


# request bodies the routes parse themselves; their nested schemas go into the OpenAPI components
DOCUMENTED_REQUESTS = (ChatCompletionRequest, CompletionRequest, TokenizeCompletionRequest, TokenizeChatRequest,
                       DetokenizeRequest)


# ---- responses -------------------------------------------------------------------------------------------


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ResponseFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    # OpenAI's values plus "timeout" (the request's deadline passed; the output is cut short).
    finish_reason: str | None


class PromptLogprob(BaseModel):
    """vLLM's: one candidate at a prompt position (the prompt's own token, with its rank, and the top ones)."""

    logprob: float
    rank: int
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # per prompt token (None for the first), token id -> it


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with the request's prompt_logprobs


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with the request's prompt_logprobs: on the first chunk


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token under echo (nothing precedes it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, with the request's prompt_logprobs


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepfleet"
    max_model_len: int
    root: str | None = None  # as vLLM's: where the model (or the LoRA adapter) was read from
    parent: str | None = None  # a LoRA adapter's base model; None for the base model itself


class LoadLoRAAdapterRequest(_Strict):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(_Strict):
    """vLLM's /v1/unload_lora_adapter body (lora_int_id is accepted and unused: adapters are named)."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
