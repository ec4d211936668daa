"""Concurrent calls served in batches (group commit): what arrives while a batch is in flight, or in
the same event-loop tick as the first call, goes out together in the next one.

Under a burst of job submissions the server's one event loop is the bottleneck, and most of what a
submission costs it is per round trip (a pooled connection, a statement, a socket send that wakes the
database); one multi-row statement or one Redis pipeline for the burst costs little more than one
for a single request. A lone call waits for nothing: it is flushed on the next tick.

Results stay per call: the flush returns one result (or exception) per item, and an exception from
the flush itself fails every call of that batch. A call whose caller went away (cancelled) before
its batch was taken is dropped, so nothing is done on behalf of a request that no longer waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Flush = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[T, R]):
    def __init__(self, flush: Flush[T, R], max_batch: int, stopped: Callable[[], BaseException]) -> None:
        """`flush(items)` does the work for a batch; `stopped()` is the error a call gets when the
        coalescer is closed under it."""
        self._flush = flush
        self.max_batch = max_batch
        self._stopped = stopped
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, item: T) -> R:
        if self._closed:
            raise self._stopped()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await future

    async def close(self, timeout: float = 10.0) -> None:
        """Refuse new calls; let the batch in flight (and what is already pending) finish."""
        self._closed = True
        if self._drainer is not None and not self._drainer.done():
            await asyncio.wait({self._drainer}, timeout=timeout)

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # let the calls of this tick join the first batch
            while self._pending:
                batch = [(item, future) for item, future in self._pending[: self.max_batch] if not future.done()]
                self._pending = self._pending[self.max_batch :]
                if not batch:
                    continue
                try:
                    results: Sequence[R | BaseException] = await self._flush([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
                except Exception as exc:  # noqa: BLE001 - every call of the batch gets it
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results):
                    if future.done():  # its caller went away meanwhile; the work is done anyway
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._drainer = None
            if self._pending:  # cancelled mid-way (shutdown): nobody will flush these
                for _, future in self._pending:
                    if not future.done():
                        future.set_exception(self._stopped())
                self._pending = []
