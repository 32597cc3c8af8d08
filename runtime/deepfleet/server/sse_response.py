"""The SSE answer of a streaming request, as a plain ASGI response.

Starlette's StreamingResponse runs every stream in an anyio task group beside a task that listens for the client
going away (uvicorn speaks ASGI 2.3, where a send to a gone client returns quietly), and encodes every chunk. At
hundreds of streams the server's one event loop is the limit (bench/RESULTS.md, HTTP load), so this one sends the
events as the bytes they were rendered to, and watches for the disconnect with one plain task that calls
`on_close`: that aborts the engine request, and the stream's reader, woken with StreamAborted, ends at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import Response

from deepfleet.server.async_engine import StreamAborted

_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


class EventStreamResponse(Response):
    """`events`: the SSE events, each already bytes; `on_close` runs once the answer ended, however it ended (also
    when the client left before the first event: an async generator that never started runs no `finally`)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        # (no Response.__init__: there is no body to render; FastAPI sets `background` on what a route returns)
        self.status_code = 200
        self.background = None
        self._events = events
        self._on_close = on_close
        self._gone = False  # the client went away

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watcher = asyncio.create_task(self._close_on_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            async for event in self._events:
                if self._gone:  # (sends to it would return quietly): the generator's end records a 499
                    break
                await send({"type": "http.response.body", "body": event, "more_body": True})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except StreamAborted:  # the client went away: the watcher closed the stream
            pass
        finally:
            watcher.cancel()
            await self._events.aclose()  # its `finally` records how the request ended
            self._on_close()
        if self.background is not None:
            await self.background()

    async def _close_on_disconnect(self, receive: Any) -> None:
        # The body was read already, so the next ASGI message can only be the client going away.
        while (await receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        self._on_close()
