"""The in-process signal bus of the embedded default (no REDIS_URL).

One hub per process: the embedded job runner runs inside the server process, so a hint it
publishes from its worker thread reaches the server's reconciler through the same hub. Each
subscriber is called on its own event loop (thread-safe hand-over), never on the publisher's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from app.signals.messages import Signal
from app.signals.base import MessageCallback, ReconnectCallback

logger = logging.getLogger("app.signals")


class InProcessHub:
    """Process-wide fan-out of signals to the subscribed buses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, MessageCallback]] = []

    def add(self, loop: asyncio.AbstractEventLoop, callback: MessageCallback) -> None:
        with self._lock:
            self._subscribers.append((loop, callback))

    def discard(self, callback: MessageCallback) -> None:
        with self._lock:
            self._subscribers = [(lp, cb) for lp, cb in self._subscribers if cb is not callback]

    def publish(self, signal: Signal) -> int:
        """Hand `signal` to every subscriber (from any thread); the number reached."""
        with self._lock:
            subscribers = list(self._subscribers)
        reached = 0
        for loop, callback in subscribers:
            try:
                loop.call_soon_threadsafe(callback, signal)
                reached += 1
            except RuntimeError:  # that loop is closed: its server is gone
                self.discard(callback)
        return reached


HUB = InProcessHub()


class InProcessBus:
    """A server's handle on the process-wide hub; `start()` subscribes its callbacks."""

    embedded = True

    def __init__(self, hub: InProcessHub = HUB) -> None:
        self.hub = hub
        self._callbacks: list[MessageCallback] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, on_message: MessageCallback, on_reconnect: ReconnectCallback | None = None) -> None:
        """Call `on_message(signal)` on the bus's loop for every signal (an in-process bus never
        reconnects, so `on_reconnect` is never called)."""
        self._callbacks.append(on_message)
        if self._loop is not None:
            self.hub.add(self._loop, on_message)

    async def publish(self, signal: Signal) -> bool:
        self.hub.publish(signal)
        return True

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for callback in self._callbacks:
            self.hub.add(self._loop, callback)

    async def stop(self) -> None:
        for callback in self._callbacks:
            self.hub.discard(callback)
        self._loop = None
