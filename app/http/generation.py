"""Running one HTTP request on the engine: its streams (one per prompt), disconnects, its log line."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from app.engine.request import RequestOutput, SamplingParams
from app.http.errors import APIError, unavailable
from app.http.metrics import RequestTracker, ServerMetrics

from app.engine import EngineDeadError, QueueFullError


request_logger = logging.getLogger("app.http.requests")
T = TypeVar("T")

Receive = Callable[[], Awaitable[dict[str, Any]]]


class ClientDisconnected(Exception):
    """The client went away before the answer was complete."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports that the client disconnected."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it and raising ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def engine_error(exc: BaseException) -> BaseException:
    """The API error an engine exception raised before the first output stands for."""
    if isinstance(exc, QueueFullError):
        return unavailable(f"The server is at capacity: {exc}", retry_after=1)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        return unavailable("The engine has stopped; the server is shutting down", retry_after=5)
    return exc


class _StreamEnd:
    """Put on the merged queue when an engine stream ends or fails."""

    def __init__(self, index: int, error: BaseException | None = None) -> None:
        self.index = index
        self.error = error


class EngineStreams:
    """The engine streams of one HTTP request (one per prompt) merged into one; closing aborts them.

    `start()` opens every stream and waits for its first output, so errors the engine raises before
    generating (bad parameters, a full queue) surface before any response header is sent.
    """

    def __init__(
        self,
        engine: Any,
        metrics: ServerMetrics,
        requests: list[tuple[str, list[int], SamplingParams]],
        lora_name: str | None = None,
    ) -> None:
        self._engine = engine
        self._lora_name = lora_name
        self._requests = requests
        self._streams: list[Any] = [None] * len(requests)
        self._finished = [False] * len(requests)
        self._trackers: list[RequestTracker] = [metrics.tracker() for _ in requests]
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | _StreamEnd] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []
        self._closed = False
        self.prompt_tokens = sum(len(ids) for _, ids, _ in requests)
        self.cached_tokens = 0
        self.completion_tokens = 0

    @property
    def ttft(self) -> float | None:
        values = [t.ttft for t in self._trackers if t.ttft is not None]
        return min(values) if values else None

    async def _open(self, index: int) -> RequestOutput:
        request_id, prompt_ids, params = self._requests[index]
        if self._lora_name is None:
            stream = self._engine.generate(prompt_ids, params, request_id)
        else:
            stream = self._engine.generate(prompt_ids, params, request_id, lora_name=self._lora_name)
        self._streams[index] = stream
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            raise RuntimeError(f"engine stream {request_id} ended before its first output") from None

    async def start(self) -> None:
        results = await asyncio.gather(*(self._open(i) for i in range(len(self._requests))), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise engine_error(errors[0])
        for index, first in enumerate(results):
            self._queue.put_nowait((index, first))  # type: ignore[arg-type]
            if not first.finished:  # type: ignore[union-attr]
                self._pumps.append(asyncio.ensure_future(self._pump(index)))

    async def _pump(self, index: int) -> None:
        try:
            async for output in self._streams[index]:
                self._queue.put_nowait((index, output))
                if output.finished:
                    return
            self._queue.put_nowait(_StreamEnd(index))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who decides what it means
            self._queue.put_nowait(_StreamEnd(index, exc))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output delta) in arrival order, until every stream has finished."""
        while not all(self._finished):
            item = await self._queue.get()
            if isinstance(item, _StreamEnd):
                if item.error is not None:
                    raise item.error
                if not self._finished[item.index]:
                    raise RuntimeError(f"engine stream {self._requests[item.index][0]} ended unfinished")
                continue
            index, output = item
            self._trackers[index].observe(output)
            self.completion_tokens += sum(len(c.token_ids) for c in output.outputs)
            if output.finished:
                self._finished[index] = True
                self.cached_tokens += output.num_cached_tokens or 0
            yield index, output

    def abort(self) -> None:
        """Ask the engine to stop what has not finished; the streams then end with finish_reason "abort"."""
        for index, (request_id, _, _) in enumerate(self._requests):
            if self._streams[index] is not None and not self._finished[index]:
                self._engine.abort(request_id)

    async def close(self) -> None:
        """Abort what has not finished (idempotent); safe to call from a cancelled task."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.cancel()
        if self._pumps:
            await asyncio.shield(asyncio.gather(*self._pumps, return_exceptions=True))
        for index, stream in enumerate(self._streams):
            if stream is None:
                continue
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:  # finished ones too: runs the engine's own cleanup now, not at GC
                try:
                    await asyncio.shield(aclose())
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - aborting anyway
                    pass
            if not self._finished[index]:
                self._engine.abort(self._requests[index][0])


class RequestLog:
    """One log line per request: id, model, adapter, tokens in/out, TTFT, total time, status."""

    def __init__(self, request_id: str, endpoint: str, model: str | None) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.model = model
        self.adapter: str | None = None
        self.stream = False
        self.started = time.monotonic()
        self.streams: EngineStreams | None = None
        self._done = False

    def emit(self, status: int, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        streams = self.streams
        ttft = streams.ttft if streams else None
        fields = {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "adapter": self.adapter,
            "stream": self.stream,
            "prompt_tokens": streams.prompt_tokens if streams else 0,
            "completion_tokens": streams.completion_tokens if streams else 0,
            "ttft_s": round(ttft, 4) if ttft is not None else None,
            "total_s": round(time.monotonic() - self.started, 4),
            "status": status,
        }
        if error:
            fields["error"] = error
        message = " ".join(f"{k}={v}" for k, v in fields.items() if k != "error" or v)
        request_logger.info(message, extra=fields)
