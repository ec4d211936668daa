"""Server-sent events as OpenAI sends them, with a cleanup that runs however the stream ends.

Litestar's own Stream response never runs a generator's `finally` when the client leaves before
the first chunk; this response owns the whole exchange, so the engine request is always aborted
and the in-flight count always released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Response

from app.http.generation import wait_for_disconnect

logger = logging.getLogger("app.http")

DONE = b"data: [DONE]\n\n"


class SSEResponse(Response):
    """A Litestar response that plays `events` as text/event-stream and then calls `on_close(status)`.

    `on_close` receives 200 when the stream ran to its end, 499 when the client left first.
    """

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[int], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content=None, headers=headers, media_type="text/event-stream")
        self._events = events
        self._on_close = on_close
        self._extra_headers = headers or {}

    def to_asgi_response(self, app: Any, request: Any, **kwargs: Any) -> _SSEApp:  # type: ignore[override]
        headers = {**self._extra_headers, **(kwargs.get("headers") or {})}
        return _SSEApp(self._events, self._on_close, headers)


class _SSEApp:
    def __init__(
        self, events: AsyncIterator[bytes], on_close: Callable[[int], Awaitable[None]], headers: dict[str, str]
    ) -> None:
        self._events = events
        self._on_close = on_close
        self._headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ] + [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        status = 499
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            sender = asyncio.ensure_future(self._send_all(send))
            watcher = asyncio.ensure_future(wait_for_disconnect(receive))
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and not sender.cancelled() and sender.exception() is None:
                status = 200
            for task in (sender, watcher):
                task.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
        except OSError:  # the client went away while we were sending the headers
            pass
        finally:
            try:
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await asyncio.shield(aclose())
            except (Exception, asyncio.CancelledError):  # noqa: BLE001
                logger.debug("closing an event stream failed", exc_info=True)
            await asyncio.shield(self._on_close(status))

    async def _send_all(self, send: Any) -> None:
        async for chunk in self._events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
