"""Per-app server state (settings, engine, readiness) and the per-request record that feeds the metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from deepfleet.engine.errors import StartupError
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.models.generation_config import generation_defaults
from deepfleet.server.api_processes import MULTIPROC_ENV
from deepfleet.server.async_engine import AsyncEngine
from deepfleet.server.config import ServeSettings
from deepfleet.server.engine_loop import ThreadDriver
from deepfleet.server.engine_process import ProcessDriver
from deepfleet.server.errors import APIError, overloaded
from deepfleet.server.metrics import LoadSnapshot, ServerMetrics, nvml_collector
from deepfleet.server.render import TokenText

log = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello! Please introduce yourself."


class RequestRecord:
    """Timing of one inference request: queue time, TTFT, TPOT and the end-to-end latency, observed once."""

    def __init__(self, metrics: ServerMetrics, endpoint: str, timeout_s: float) -> None:
        self._metrics = metrics
        self._endpoint = endpoint
        self.arrival = time.monotonic()
        self.deadline = self.arrival + timeout_s
        self.created = int(time.time())
        self._id = uuid.uuid4().hex
        self._first_token: float | None = None
        self._last_token = 0.0
        self._tokens = 0
        self._done = False

    def response_id(self, prefix: str) -> str:
        return f"{prefix}-{self._id}"

    def accepted(self) -> None:
        self._metrics.queue_time.labels(self._endpoint).observe(time.monotonic() - self.arrival)

    def tokens_seen(self, batch: dict[int, Any]) -> None:
        tokens = max(len(out.outputs[0].token_ids) for out in batch.values())
        if tokens <= self._tokens:
            return
        now = time.monotonic()
        if self._first_token is None:
            self._first_token = now
            self._metrics.ttft.labels(self._endpoint).observe(now - self.arrival)
        self._last_token, self._tokens = now, tokens

    def done(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.request_done(self._endpoint, status, time.monotonic() - self.arrival)
        if self._first_token is not None and self._tokens > 1:
            self._metrics.tpot.labels(self._endpoint).observe(
                (self._last_token - self._first_token) / (self._tokens - 1)
            )


class ServerState:
    """Lifecycle: loading -> warming_up -> ready (or failed); `draining` once SIGTERM arrived."""

    def __init__(self, settings: ServeSettings, engine_factory: Callable[[ServeSettings], Any],
                 peer: Any = None) -> None:
        self.settings = settings
        self.peer = peer  # api_processes.Peer: one of several API processes sharing the engine
        self.model_name = settings.model_name()
        self.created = int(time.time())
        self._engine_factory = engine_factory
        self.engine: AsyncEngine | None = None
        self.tokenizer: Any = None
        self.token_text: TokenText | None = None
        self.max_model_len = 0
        # LoRA adapters a request's `model` may name: name -> directory (the engine loads the start-up ones)
        self.lora_enabled = bool(settings.engine.enable_lora or settings.engine.lora_modules)
        self.lora_adapters: dict[str, str] = dict(settings.engine.lora_modules or {})
        self.generation_defaults: dict[str, Any] = {}  # request field -> the model's default (generation_config)
        self.phase = "loading"
        self.error: str | None = None
        self.draining = False
        # Set by the process runner: exit (status 1) when loading fails or the engine dies, so systemd or the
        # kubelet restarts the server instead of leaving a process that can only answer 503.
        self.on_fatal: Callable[[], None] | None = None
        self.metrics = ServerMetrics(self._snapshot, nvml_collector(), self.model_name,
                                     multiprocess_dir=None if peer is None else os.environ[MULTIPROC_ENV])

    def _snapshot(self) -> LoadSnapshot:
        if self.engine is None:
            return LoadSnapshot(0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, ready=False)
        return self.engine.snapshot(ready=self.ready)

    @property
    def ready(self) -> bool:
        ready = self.phase == "ready" and not self.draining and self.alive
        return ready and (self.peer is None or self.peer.board.all_ready())

    @property
    def alive(self) -> bool:
        return self.phase != "failed" and (self.engine is None or self.engine.dead is None)

    def begin(self, request: Request, endpoint: str) -> RequestRecord:
        record = RequestRecord(self.metrics, endpoint, self.settings.request_timeout_s)
        request.state.record = record  # the error handlers record the status of requests that fail early
        return record

    def check_accepting(self) -> None:
        retry = self.settings.retry_after_s
        if self.draining:
            raise overloaded(503, "server is shutting down; retry on another replica", "shutting_down", retry)
        if self.phase == "failed" or not self.alive:
            raise APIError(503, f"engine unavailable: {self.error or self.engine.dead}", type="server_error",
                           code="engine_unavailable")
        if self.phase != "ready":
            raise overloaded(503, f"model is {self.phase.replace('_', ' ')}; retry shortly", "not_ready", retry)

    async def start(self) -> None:
        """Load the engine (in a thread: it takes a while) and warm it up; /readyz turns ready after."""
        s = self.settings
        try:
            t0 = time.monotonic()
            if s.generation_config == "auto":
                self.generation_defaults = generation_defaults(s.model)
            if self.peer is not None:
                driver = await asyncio.to_thread(self.peer.connect)
            elif s.engine_process:
                driver = await asyncio.to_thread(ProcessDriver.launch, self._engine_factory, s)
            else:
                driver = ThreadDriver(await asyncio.to_thread(self._engine_factory, s))
            self.tokenizer = driver.tokenizer
            if s.chat_template is not None:
                self.tokenizer.replace_chat_templates(s.chat_template)
            self.token_text = TokenText(driver.tokenizer)
            self.max_model_len = driver.max_model_len
            # unset: as many as the engine batches at once, so admission never caps its throughput
            slots = s.max_concurrent or driver.max_num_seqs
            if self.peer is None:
                self.engine = AsyncEngine(driver, slots, s.max_queue)
            else:  # the slots and queue places split between the API processes
                self.engine = AsyncEngine(driver, max(1, self.peer.share(slots)), self.peer.share(s.max_queue),
                                          f"{self.peer.owner}:", self.peer.board)
            self.engine.on_death = self._fatal
            self.engine.start()
            log.info("model %s loaded in %.1f s", self.model_name, time.monotonic() - t0)
            self.phase = "warming_up"
            t0 = time.monotonic()
            for _ in range(s.warmup_requests):
                await self._warmup_once()
            log.info("warm-up: %d requests in %.2f s; ready", s.warmup_requests, time.monotonic() - t0)
            self.phase = "ready"
            if self.peer is not None:
                self.peer.board.set_ready(True)
        except StartupError as exc:  # the message names the settings to change
            log.error("model %s failed to load: %s", self.model_name, exc)
            self.phase, self.error = "failed", str(exc)
            self._fatal()
        except Exception as exc:
            log.exception("model %s failed to load", self.model_name)
            self.phase, self.error = "failed", f"{type(exc).__name__}: {exc}"
            self._fatal()

    def _fatal(self) -> None:
        if self.on_fatal is not None:
            self.on_fatal()

    async def _warmup_once(self) -> None:
        """One short generation through the same path as requests (compiles kernels, fills caches)."""
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template([{"role": "user", "content": WARMUP_PROMPT}], add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        except ValueError:  # no chat template
            ids = tok.encode(WARMUP_PROMPT)
        params = SamplingParams(temperature=0.0, max_tokens=self.settings.warmup_max_tokens, ignore_eos=True)
        stream = await self.engine.submit([ids], [params], priority=0, deadline=None, queue_timeout=None)
        try:
            async for _ in stream.updates():
                pass
        finally:
            self.engine.close(stream)

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
