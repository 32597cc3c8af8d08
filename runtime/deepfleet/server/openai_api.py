"""The OpenAI routes: /v1/chat/completions, /v1/completions (JSON or SSE) and /v1/models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from jinja2.exceptions import TemplateError

from deepfleet.engine.errors import SlotsBusy
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.server import protocol as p
from deepfleet.server import render
from deepfleet.server.admission import QueueFull
from deepfleet.server.async_engine import DeadlineExceeded, EngineDead, RequestStream, StreamAborted
from deepfleet.server.errors import APIError, bad_request, from_value_error, overloaded
from deepfleet.server.openapi_errors import INFERENCE, TOKENIZER, responses, streaming_200
from deepfleet.server.reasoning import ReasoningParser, prompt_opens_reasoning
from deepfleet.server.request_body import parse_as, read_json
from deepfleet.server.sse_response import EventStreamResponse
from deepfleet.server.state import RequestRecord, ServerState
from deepfleet.server.tool_calls import (
    ForcedCallStream,
    ToolCallStream,
    call_id,
    forced_call_schema,
    format_for_templates,
)
from deepfleet.structured.spec import StructuredOutput

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CLIENT_CLOSED = 499  # nginx's "client closed request": the status recorded when a client goes away

router = APIRouter()


@dataclass
class _Job:
    """One validated request, ready for the engine."""

    endpoint: str
    body: p.ChatCompletionRequest | p.CompletionRequest
    prompts: list[list[int]]  # token ids of each prompt (completions may batch several; chat has one)
    params: list[SamplingParams]  # one per choice: prompt k's choices are k*n .. k*n+n-1
    priority: int
    reasoning_starts_open: bool | None  # None: no reasoning split (completions, or parser off)
    echo: list[str] | None = None  # completions with echo: each prompt's text, sent before its output
    tool_stream: Callable[[], Any] | None = None  # chat with tools: a fresh tool-call parser per choice
    named_tool: bool = False  # tool_choice named a function: finish_reason stays "stop", as OpenAI's
    base_model: str = ""  # the served base model's name (any other `model` is an adapter's)

    @property
    def lora(self) -> str | None:
        """The LoRA adapter the request's `model` names; None: the base model."""
        return None if self.body.model == self.base_model else self.body.model

    def engine_prompts(self) -> list[list[int]]:
        n = len(self.params) // len(self.prompts)
        return [self.prompts[i // n] for i in range(len(self.params))]

    def echo_text(self, choice: int) -> str:
        return "" if self.echo is None else self.echo[choice * len(self.prompts) // len(self.params)]


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _priority(request: Request, body: p.ChatCompletionRequest | p.CompletionRequest) -> int:
    if body.priority is not None:
        return body.priority
    header = request.headers.get("x-priority")
    if header is None:
        return 0
    try:
        value = int(header)
    except ValueError:
        raise bad_request("X-Priority: must be an integer (lower is more urgent)", param="X-Priority") from None
    if abs(value) > p.MAX_PRIORITY:
        raise bad_request(f"X-Priority: must be within +-{p.MAX_PRIORITY}", param="X-Priority")
    return value


def _max_tokens(state: ServerState, requested: int | None, prompt_len: int, prompt_field: str) -> int:
    room = state.max_model_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"{prompt_field}: the prompt is {prompt_len} tokens; this model's context is {state.max_model_len} "
            "tokens including the output",
            param=prompt_field,
            code="context_length_exceeded",
        )
    if requested is None:
        return room
    if requested > room:
        raise APIError(
            400,
            f"max_tokens: {requested} output tokens do not fit: the prompt is {prompt_len} tokens and the "
            f"context {state.max_model_len} (at most {room} here)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def _defaulted(state: ServerState, body: p.ChatCompletionRequest | p.CompletionRequest, field: str) -> Any:
    """The request's value, or the model's generation_config.json default when the request left it out."""
    if field not in body.model_fields_set and field in state.generation_defaults:
        return state.generation_defaults[field]
    return getattr(body, field)


def _requested_max_tokens(state: ServerState, body: p.ChatCompletionRequest | p.CompletionRequest,
                          prompt_len: int) -> int | None:
    requested = body.requested_max_tokens()
    explicit = {"max_tokens", "max_completion_tokens"} & body.model_fields_set
    if not explicit and "max_tokens" in state.generation_defaults:
        # a model default never makes a request fail: it is cut to the room left
        return max(1, min(state.generation_defaults["max_tokens"], state.max_model_len - prompt_len))
    return requested


def _logit_bias(state: ServerState, body: p.ChatCompletionRequest | p.CompletionRequest) -> dict[int, float] | None:
    if not body.logit_bias:
        return None
    bias = {int(k): v for k, v in body.logit_bias.items()}
    vocab = state.tokenizer.vocab_size
    bad = sorted(t for t in bias if t >= vocab)
    if bad:
        raise bad_request(f"logit_bias: token ids must be below the vocabulary size {vocab}, got {bad[:3]}",
                          param="logit_bias")
    return bias


def _sampling(state: ServerState, body: p.ChatCompletionRequest | p.CompletionRequest, max_tokens: int,
              logprobs: int | None, rename: dict[str, str], prompts: int = 1,
              structured: StructuredOutput | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice (n per prompt); `structured`: the output constraint (default: the body's)."""
    logit_bias = _logit_bias(state, body)
    structured = structured or body.structured_output()
    try:
        return [
            SamplingParams(
                n=1,
                temperature=_defaulted(state, body, "temperature"),
                top_p=_defaulted(state, body, "top_p"),
                top_k=_defaulted(state, body, "top_k"),
                min_p=_defaulted(state, body, "min_p"),
                repetition_penalty=_defaulted(state, body, "repetition_penalty"),
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                # n choices are n engine requests; distinct, reproducible seeds keep them from being copies.
                seed=None if body.seed is None else body.seed + i,
                stop=body.stop,
                stop_token_ids=body.stop_token_ids,
                prompt_logprobs=_scored_prompt(body),
                ignore_eos=body.ignore_eos,
                max_tokens=max_tokens,
                logprobs=logprobs,
                skip_special_tokens=body.skip_special_tokens,
                logit_bias=logit_bias,
                min_tokens=body.min_tokens,
                structured=structured,
            )
            for _ in range(prompts)
            for i in range(body.n)
        ]
    except ValueError as exc:
        raise from_value_error(exc, rename) from None


def _echo_logprobs(body: p.ChatCompletionRequest | p.CompletionRequest) -> bool:
    """OpenAI's completions with `echo` and `logprobs`: the echoed prompt's tokens lead the choice's logprobs."""
    return isinstance(body, p.CompletionRequest) and body.echo and body.logprobs is not None


def _scored_prompt(body: p.ChatCompletionRequest | p.CompletionRequest) -> int | None:
    """Top alternatives the engine scores each prompt token with: vLLM's prompt_logprobs and echo's logprobs
    (one scoring, with the larger k; each field shows its own k)."""
    wanted = [k for k in (body.prompt_logprobs, body.logprobs if _echo_logprobs(body) else None) if k is not None]
    return max(wanted) if wanted else None


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name and model not in state.lora_adapters:
        raise APIError(
            404, f"model: '{model}' is not served here (this server serves '{state.model_name}')",
            param="model", code="model_not_found",
        )


def _common_checks(state: ServerState, body: p.ChatCompletionRequest | p.CompletionRequest) -> None:
    """`model` names the base model or a loaded LoRA adapter (which then serves the request)."""
    if body.model != state.model_name and body.model not in state.lora_adapters:
        adapters = f" or the LoRA adapters {', '.join(sorted(state.lora_adapters))}" if state.lora_adapters else ""
        raise APIError(
            404, f"model: '{body.model}' is not served here (this server serves '{state.model_name}'{adapters})",
            param="model", code="model_not_found",
        )
    if body.n > state.settings.max_n:
        raise bad_request(f"n: at most {state.settings.max_n} choices per request", param="n")


def _chat_prompt(state: ServerState, messages: list[p.ChatMessage], template_kwargs: dict[str, Any] | None,
                 add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
    history = [m.for_template() for m in messages]
    kwargs = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    try:
        return state.tokenizer.apply_chat_template(history, add_generation_prompt=add_generation_prompt, **kwargs)
    except (TemplateError, ValueError, TypeError) as exc:
        raise bad_request(f"messages: cannot be formatted with this model's chat template: {exc}",
                          param="messages") from None


def _tool_calling(state: ServerState, body: p.ChatCompletionRequest) -> tuple[StructuredOutput | None, Any]:
    """(the grammar of a forced call or None, a factory of the per-choice tool-call parser or None)."""
    mode = body.tool_mode()
    if mode in ("required", "named"):
        named = body.tool_choice.function.name if mode == "named" else None
        schema = forced_call_schema(body.tools, named, body.parallel_tool_calls is not False)
        return StructuredOutput.json_schema(schema, "tools"), lambda: ForcedCallStream(named)
    fmt = format_for_templates(getattr(state.tokenizer, "chat_templates", {})) if mode == "auto" else None
    # auto with a model whose template teaches no known format: its output is plain content
    return None, (lambda: ToolCallStream(fmt)) if fmt is not None else None


def _prepare_chat(state: ServerState, request: Request, body: p.ChatCompletionRequest) -> _Job:
    _common_checks(state, body)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tool_mode() != "none" else None
    prompt = _chat_prompt(state, body.messages, body.chat_template_kwargs, tools=tools)
    # The template writes BOS itself (as transformers' apply_chat_template(tokenize=True)).
    prompt_ids = state.tokenizer.encode(prompt, add_special_tokens=False)
    max_tokens = _max_tokens(state, _requested_max_tokens(state, body, len(prompt_ids)), len(prompt_ids), "messages")
    forced, tool_stream = _tool_calling(state, body)
    params = _sampling(state, body, max_tokens, body.requested_logprobs(), {"logprobs": "top_logprobs"},
                       structured=forced)
    # A grammar constrains the output from its first token, so there is no reasoning to split off.
    split = state.settings.reasoning_parser == "deepseek_r1" and params[0].structured is None
    starts_open = prompt_opens_reasoning(prompt) if split else None
    return _Job(CHAT, body, [prompt_ids], params, _priority(request, body), starts_open, None, tool_stream,
                body.tool_mode() == "named")


def _prepare_completion(state: ServerState, request: Request, body: p.CompletionRequest) -> _Job:
    _common_checks(state, body)
    prompts = body.prompts()
    field = "prompt" if len(prompts) == 1 else "prompt[{}]"
    if len(prompts) * body.n > state.settings.max_n:
        raise bad_request(f"prompt: {len(prompts)} prompts x n={body.n} choices exceed the {state.settings.max_n} "
                          "choices a request may have", param="prompt")
    vocab = state.tokenizer.vocab_size
    ids_per_prompt = []
    for k, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids_per_prompt.append(state.tokenizer.encode(prompt))
            continue
        if any(t >= vocab for t in prompt):
            name = field.format(k)
            raise bad_request(f"{name}: token ids must be below the vocabulary size {vocab}", param=name)
        ids_per_prompt.append(list(prompt))
    max_tokens = min(_max_tokens(state, _requested_max_tokens(state, body, len(ids)), len(ids), field.format(k))
                     for k, ids in enumerate(ids_per_prompt))
    params = _sampling(state, body, max_tokens, body.requested_logprobs(), {}, prompts=len(prompts))
    echo = None
    if body.echo:
        echo = [pr if isinstance(pr, str) else state.tokenizer.decode(pr, skip_special_tokens=False)
                for pr in prompts]
    return _Job(COMPLETIONS, body, ids_per_prompt, params, _priority(request, body), None, echo)


async def _start(state: ServerState, job: _Job, record: RequestRecord) -> RequestStream:
    s = state.settings
    try:
        stream = await state.engine.submit(
            job.engine_prompts(), job.params, priority=job.priority, lora=job.lora,
            deadline=record.deadline, queue_timeout=max(record.deadline - time.monotonic(), 0),
        )
    except QueueFull:
        a = state.engine.admission
        raise overloaded(s.queue_full_status, f"server at capacity: {a.active} requests running and {a.queued} "
                         "queued; retry later", "queue_full", s.retry_after_s) from None
    except asyncio.TimeoutError:
        raise overloaded(503, f"no capacity within the request timeout ({s.request_timeout_s:g} s); retry later",
                         "queue_timeout", s.retry_after_s) from None
    except SlotsBusy as exc:
        raise overloaded(503, str(exc), "lora_slots_busy", s.retry_after_s) from None
    except ValueError as exc:
        raise from_value_error(exc) from None
    except EngineDead as exc:
        raise _engine_unavailable(exc) from None
    record.accepted()
    return stream


def _engine_unavailable(exc: EngineDead) -> APIError:
    return APIError(503, f"engine unavailable: {exc}", type="server_error", code="engine_unavailable")


async def _abort_on_disconnect(request: Request, state: ServerState, stream: RequestStream) -> None:
    # The body was read already, so the next ASGI message can only be the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    state.engine.close(stream)


async def _run(state: ServerState, request: Request, job: _Job, record: RequestRecord,
               on_update: Callable[[dict[int, Any]], None]) -> bool:
    """Drive a non-streaming request to its end; False when its deadline passed first."""
    stream = await _start(state, job, record)
    watcher = asyncio.create_task(_abort_on_disconnect(request, state, stream))
    try:
        async for batch in stream.updates(record.deadline):
            record.tokens_seen(batch)
            on_update(batch)
        return True
    except DeadlineExceeded:
        return False
    except EngineDead as exc:
        raise _engine_unavailable(exc) from None
    finally:
        watcher.cancel()
        state.engine.close(stream)


def _cursors(job: _Job) -> list[render.ChoiceCursor]:
    return [
        render.ChoiceCursor(None if job.reasoning_starts_open is None else ReasoningParser(job.reasoning_starts_open),
                            job.tool_stream() if job.tool_stream else None, calls_finish=not job.named_tool)
        for _ in job.params
    ]


def _finish_timed_out(cursors: list[render.ChoiceCursor]) -> None:
    for cursor in cursors:
        cursor.finish_reason = cursor.finish_reason or "timeout"


def _usage(job: _Job, cursors: list[render.ChoiceCursor], cached: int) -> p.Usage:
    return render.usage(sum(map(len, job.prompts)), sum(c.num_tokens for c in cursors), cached)


async def _chat_json(state: ServerState, request: Request, job: _Job, record: RequestRecord) -> Response:
    cursors = _cursors(job)
    parts = [{"reasoning": [], "content": [], "logprobs": []} for _ in cursors]
    cached = 0
    prompt_lps: list[Any] = [None]

    def on_update(batch: dict[int, Any]) -> None:
        nonlocal cached
        for i, out in batch.items():
            cached = max(cached, out.num_cached_tokens)
            prompt_lps[0] = prompt_lps[0] or out.prompt_logprobs
            reasoning, content, logprobs = cursors[i].advance(out.outputs[0])
            parts[i]["reasoning"].append(reasoning)
            parts[i]["content"].append(content)
            parts[i]["logprobs"].extend(logprobs)

    if not await _run(state, request, job, record, on_update):
        _finish_timed_out(cursors)
    want_logprobs = job.params[0].logprobs is not None
    choices = [
        p.ChatChoice(
            index=i,
            message=p.AssistantMessage(
                content="".join(part["content"]) or (None if cursor.tool_calls else ""),
                reasoning_content="".join(part["reasoning"]) if cursor.saw_reasoning else None,
                tool_calls=render.tool_calls(cursor.tool_calls, [call_id() for _ in cursor.tool_calls]),
            ),
            logprobs=render.chat_logprobs(part["logprobs"], state.token_text) if want_logprobs else None,
            finish_reason=cursor.finish_reason,
        )
        for i, (cursor, part) in enumerate(zip(cursors, parts, strict=True))
    ]
    body = p.ChatCompletion(id=record.response_id("chatcmpl"), created=record.created, model=job.body.model,
                            choices=choices, usage=_usage(job, cursors, cached),
                            prompt_logprobs=_prompt_logprobs(state, prompt_lps[0], job.body.prompt_logprobs))
    return Response(body.model_dump_json(), media_type="application/json")


def _prompt_logprobs(state: ServerState, entries: list | None, k: int | None) -> p.PromptLogprobs | None:
    """vLLM's prompt_logprobs field, when the request asked for it (k) and the prompt was scored."""
    return None if entries is None or k is None else render.prompt_logprobs(entries, state.token_text, k)


def _choice_logprobs(state: ServerState, job: _Job, i: int, prompt: list | None, entries: list[dict[str, Any]],
                     offset: int) -> p.CompletionLogprobs:
    """A completion choice's logprobs: with echo, the prompt's (when scored: `prompt`) lead, and the output's text
    offsets start after the echoed text; `offset`: where this part of the output starts without echo."""
    lead = None
    if prompt is not None and _echo_logprobs(job.body):
        lead = render.echo_logprobs(job.engine_prompts()[i], prompt, state.token_text, job.body.logprobs)
        offset += len(job.echo_text(i))
    return render.completion_logprobs(entries, state.token_text, offset, out=lead)


async def _completion_json(state: ServerState, request: Request, job: _Job, record: RequestRecord) -> Response:
    cursors = _cursors(job)
    texts: list[list[str]] = [[job.echo_text(i)] for i in range(len(cursors))]
    logprobs: list[list[dict[str, Any]]] = [[] for _ in cursors]
    prompt_lps: list[Any] = [None] * len(cursors)
    cached = 0

    def on_update(batch: dict[int, Any]) -> None:
        nonlocal cached
        for i, out in batch.items():
            cached = max(cached, out.num_cached_tokens)
            prompt_lps[i] = prompt_lps[i] or out.prompt_logprobs
            _, content, lps = cursors[i].advance(out.outputs[0])
            texts[i].append(content)
            logprobs[i].extend(lps)

    if not await _run(state, request, job, record, on_update):
        _finish_timed_out(cursors)
    want_logprobs = job.params[0].logprobs is not None
    choices = [
        p.CompletionChoice(
            index=i,
            text="".join(texts[i]),
            logprobs=_choice_logprobs(state, job, i, prompt_lps[i], logprobs[i], 0) if want_logprobs else None,
            finish_reason=cursor.finish_reason,
            prompt_logprobs=_prompt_logprobs(state, prompt_lps[i], job.body.prompt_logprobs),
        )
        for i, cursor in enumerate(cursors)
    ]
    body = p.Completion(id=record.response_id("cmpl"), created=record.created, model=job.body.model,
                        choices=choices, usage=_usage(job, cursors, cached))
    return Response(body.model_dump_json(), media_type="application/json")


async def _sse(state: ServerState, job: _Job, record: RequestRecord, stream: RequestStream,
               chunk: Callable[[int, str, str, list[dict[str, Any]], str | None, list[Any], list | None], Any],
               first: Callable[[int], Any] | None, usage_chunk: Callable[[p.Usage], Any]) -> AsyncIterator[bytes]:
    """SSE events of one streaming request; closing the generator (client gone) aborts the engine request.
    `chunk`'s last argument: the prompt's logprob entries on the choice's first update when it was scored (vLLM's
    prompt_logprobs, echo with logprobs), else None."""
    cursors = _cursors(job)
    prompt_sent = [False] * len(cursors)
    cached = 0
    status = CLIENT_CLOSED
    try:
        if first is not None:
            for i in range(len(cursors)):
                yield render.sse(first(i))
        try:
            async for batch in stream.updates(record.deadline):
                record.tokens_seen(batch)
                for i, out in sorted(batch.items()):
                    cached = max(cached, out.num_cached_tokens)
                    reasoning, content, logprobs = cursors[i].advance(out.outputs[0])
                    finish = cursors[i].finish_reason  # set once the output ended (may be "tool_calls")
                    calls = cursors[i].call_deltas
                    prompt = None if prompt_sent[i] else out.prompt_logprobs
                    prompt_sent[i] = prompt_sent[i] or prompt is not None
                    if reasoning or content or logprobs or finish or calls or prompt is not None:
                        yield render.sse(chunk(i, reasoning, content, logprobs, finish, calls, prompt))
        except DeadlineExceeded:
            for i, cursor in enumerate(cursors):
                if cursor.finish_reason is None:
                    yield render.sse(chunk(i, "", "", [], "timeout", [], None))
        except EngineDead as exc:
            status = 500
            err = p.ErrorResponse(error=p.ErrorDetail(message=f"engine unavailable: {exc}", type="server_error",
                                                      code="engine_unavailable"))
            yield render.sse(err)
            return
        if job.body.include_usage_in_stream():
            yield render.sse(usage_chunk(_usage(job, cursors, cached)))
        yield render.SSE_DONE
        status = 200
    finally:
        state.engine.close(stream)
        record.done(status)


def _chat_stream(state: ServerState, job: _Job, record: RequestRecord, stream: RequestStream) -> AsyncIterator[bytes]:
    # chunks are plain dicts in ChatCompletionChunk's shape, null fields left out (render.sse)
    head = {"id": record.response_id("chatcmpl"), "object": "chat.completion.chunk", "created": record.created,
            "model": job.body.model}
    want_logprobs = job.params[0].logprobs is not None

    def first(i: int) -> dict[str, Any]:
        return {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]}

    def chunk(i: int, reasoning: str, content: str, logprobs: list, finish: str | None, calls: list[Any],
              prompt: list | None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        if calls:
            delta["tool_calls"] = calls
        choice: dict[str, Any] = {"index": i, "delta": delta}
        if want_logprobs:
            choice["logprobs"] = render.chat_logprobs(logprobs, state.token_text)
        if finish is not None:
            choice["finish_reason"] = finish
        out = {**head, "choices": [choice]}
        # at the top level, as the non-streamed answer has it: once, with choice 0's first chunk
        plp = _prompt_logprobs(state, prompt, job.body.prompt_logprobs) if i == 0 else None
        if plp is not None:
            out["prompt_logprobs"] = plp
        return out

    return _sse(state, job, record, stream, chunk, first, lambda usage: {**head, "choices": [], "usage": usage})


def _completion_stream(state: ServerState, job: _Job, record: RequestRecord,
                       stream: RequestStream) -> AsyncIterator[bytes]:
    # chunks are plain dicts in Completion's shape, null fields left out (render.sse)
    head = {"id": record.response_id("cmpl"), "object": "text_completion", "created": record.created,
            "model": job.body.model}
    want_logprobs = job.params[0].logprobs is not None
    offsets = [0] * len(job.params)

    # echo with logprobs: the echoed text waits for the first update, which brings the prompt's logprobs
    echo_first = job.echo is not None and not _echo_logprobs(job.body)

    def chunk(i: int, _reasoning: str, text: str, logprobs: list, finish: str | None, _calls: list,
              prompt: list | None) -> dict[str, Any]:
        lp = _choice_logprobs(state, job, i, prompt, logprobs, offsets[i]) if want_logprobs else None
        if prompt is not None and _echo_logprobs(job.body):
            text = job.echo_text(i) + text
        offsets[i] += len(text)
        choice: dict[str, Any] = {"index": i, "text": text}
        if lp is not None:
            choice["logprobs"] = lp
        if finish is not None:
            choice["finish_reason"] = finish
        plp = _prompt_logprobs(state, prompt, job.body.prompt_logprobs)
        if plp is not None:
            choice["prompt_logprobs"] = plp
        return {**head, "choices": [choice]}

    def first(i: int) -> dict[str, Any]:
        return {**head, "choices": [{"index": i, "text": job.echo_text(i)}]}

    return _sse(state, job, record, stream, chunk, first if echo_first else None,
                lambda usage: {**head, "choices": [], "usage": usage})


async def _serve(request: Request, endpoint: str, model: type, prepare: Callable, as_json: Callable,
                 as_stream: Callable) -> Response:
    state = _state(request)
    record = state.begin(request, endpoint)
    body = parse_as(model, await read_json(request, state.settings.max_body_bytes))
    state.check_accepting()
    job = prepare(state, request, body)
    job.base_model = state.model_name
    if not body.stream:
        try:
            response = await as_json(state, request, job, record)
        except StreamAborted:
            record.done(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        record.done(200)
        return response
    stream = await _start(state, job, record)
    return EventStreamResponse(as_stream(state, job, record, stream), lambda: _closed(state, stream, record))


def _closed(state: ServerState, stream: RequestStream, record: RequestRecord) -> None:
    state.engine.close(stream)
    record.done(CLIENT_CLOSED)  # no-op when the stream already recorded how it ended


REF_TEMPLATE = "#/components/schemas/{model}"


def _body_doc(model: type) -> dict[str, Any]:
    """The request body in the OpenAPI document (the routes parse bodies themselves, for their error messages);
    app.openapi() adds the nested models' schemas to components."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _body_doc_any_of(*models: type) -> dict[str, Any]:
    schemas = []
    for model in models:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        schema.pop("$defs", None)
        schemas.append(schema)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"anyOf": schemas}}}}}


@router.post(CHAT, summary="Chat completion (OpenAI)", response_model=p.ChatCompletion,
             responses={**streaming_200(), **responses(INFERENCE)},
             openapi_extra=_body_doc(p.ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await _serve(request, CHAT, p.ChatCompletionRequest, _prepare_chat, _chat_json, _chat_stream)


@router.post(COMPLETIONS, summary="Text completion (OpenAI)", response_model=p.Completion,
             responses={**streaming_200(), **responses(INFERENCE)},
             openapi_extra=_body_doc(p.CompletionRequest))
async def completions(request: Request) -> Response:
    return await _serve(request, COMPLETIONS, p.CompletionRequest, _prepare_completion, _completion_json,
                        _completion_stream)


@router.get("/v1/models", summary="Served models (OpenAI)", response_model=p.ModelList)
async def models(request: Request) -> p.ModelList:
    state = _state(request)
    card = p.ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len,
                       root=state.settings.model)
    adapters = [p.ModelCard(id=name, created=state.created, max_model_len=state.max_model_len, root=path,
                            parent=state.model_name) for name, path in sorted(state.lora_adapters.items())]
    return p.ModelList(data=[card, *adapters])


# {model:path}: served names may hold slashes (e.g. deepseek-ai/DeepSeek-R1), as in OpenAI's and vLLM's routes
@router.get("/v1/models/{model:path}", summary="One served model or LoRA adapter (OpenAI)",
            response_model=p.ModelCard, responses=responses((404,)))
async def model_card(request: Request, model: str) -> p.ModelCard:
    _check_model(_state(request), model)
    return next(card for card in (await models(request)).data if card.id == model)


@router.post("/tokenize", summary="Token ids of a prompt or a conversation (vLLM)", response_model=p.TokenizeResponse,
             responses=responses(TOKENIZER),
             openapi_extra=_body_doc_any_of(p.TokenizeCompletionRequest, p.TokenizeChatRequest))
async def tokenize(request: Request) -> p.TokenizeResponse:
    raw = await read_json(request, _state(request).settings.max_body_bytes)
    chat = isinstance(raw, dict) and "messages" in raw
    state = _state(request)
    body = parse_as(p.TokenizeChatRequest if chat else p.TokenizeCompletionRequest, raw)
    state.check_accepting()
    _check_model(state, body.model)
    if chat:
        text = _chat_prompt(state, body.messages, body.chat_template_kwargs, body.add_generation_prompt)
    else:
        text = body.prompt
    ids = state.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
    strs = [state.token_text(t) for t in ids] if body.return_token_strs else None
    return p.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", summary="Text of token ids (vLLM)", response_model=p.DetokenizeResponse,
             responses=responses(TOKENIZER),
             openapi_extra=_body_doc(p.DetokenizeRequest))
async def detokenize(request: Request) -> p.DetokenizeResponse:
    state = _state(request)
    body = parse_as(p.DetokenizeRequest, await read_json(request, state.settings.max_body_bytes))
    state.check_accepting()
    _check_model(state, body.model)
    vocab = state.tokenizer.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise bad_request(f"tokens: token ids must be below the vocabulary size {vocab}", param="tokens")
    return p.DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens, skip_special_tokens=False))
