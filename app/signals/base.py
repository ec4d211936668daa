"""What a signal bus looks like to the rest of the server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from app.signals.messages import Signal

MessageCallback = Callable[[Signal], None]  # called on the subscriber's event loop; must not block
ReconnectCallback = Callable[[], None]  # called after the bus got its connection back


class SignalBus(Protocol):
    embedded: bool

    def subscribe(self, on_message: MessageCallback, on_reconnect: ReconnectCallback | None = None) -> None: ...

    async def publish(self, signal: Signal) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
