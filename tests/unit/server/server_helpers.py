"""Helpers of the server tests: real servers on 127.0.0.1 (uvicorn on a real socket, in a thread), reached with
the official `openai` client and httpx; a /metrics scrape parser."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from deepfleet.server.app import build_engine, create_app
from deepfleet.server.config import ServeSettings
from deepfleet.server.tls import uvicorn_options

MODEL_NAME = "tiny-r1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server in a background thread; `url` is its base address."""

    def __init__(self, settings: ServeSettings, engine_factory: Callable[[ServeSettings], Any] = build_engine):
        self.settings = settings
        self.app = create_app(settings, engine_factory)
        self.url = f"{'https' if settings.tls.enabled else 'http'}://127.0.0.1:{settings.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=settings.shutdown_grace_s,
                                **uvicorn_options(settings.tls))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def start(self, wait_ready: bool = True, timeout: float = 120) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.server.started and (not wait_ready or self.state.phase in ("ready", "failed")):
                return self
            time.sleep(0.02)
        raise TimeoutError("server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metrics(self) -> dict[str, float]:
        """Unlabelled (or first-seen) sample values by name, from a real scrape of /metrics."""
        text = httpx.get(self.url + "/metrics").text
        values: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$", line)
            if m:
                values.setdefault(m.group(1) + (m.group(2) or ""), float(m.group(3)))
        return values


def settings_for(model_dir: Path, **overrides: Any) -> ServeSettings:
    base = {"model": str(model_dir), "served_model_name": MODEL_NAME, "host": "127.0.0.1", "port": free_port(),
            "warmup_requests": 1, "shutdown_grace_s": 10}
    engine = overrides.pop("engine", {})
    return ServeSettings.model_validate({**base, **overrides, "engine": engine})


@contextlib.contextmanager
def live_server(settings: ServeSettings, engine_factory=build_engine, wait_ready: bool = True) -> Iterator[LiveServer]:
    server = LiveServer(settings, engine_factory).start(wait_ready=wait_ready)
    try:
        yield server
    finally:
        server.stop()
