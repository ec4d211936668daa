"""The Redis signal bus: PUBLISH on one channel, and a listener that comes back by itself.

The listener reconnects with capped exponential backoff. Messages published while it was away are
lost (Redis pub/sub keeps nothing), so every reconnect after a lost connection calls the
`on_reconnect` callbacks: the reconciler re-reads Postgres instead of trusting that nothing changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
import redis.asyncio as aioredis

from app.signals.base import MessageCallback, ReconnectCallback
from app.signals.messages import Signal, decode_signal, encode_signal

logger = logging.getLogger("app.signals")

CONNECT_TIMEOUT_S = 3.0
PUBLISH_CONNECT_TIMEOUT_S = 1.0  # an admin request waits on it: fail fast, the timer covers a lost hint
HEALTH_CHECK_S = 10  # a PING on the idle subscription, so a silently dead connection is noticed
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 5.0


class RedisBus:
    embedded = False

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = channel
        self._on_message: list[MessageCallback] = []
        self._on_reconnect: list[ReconnectCallback] = []
        self._publisher: aioredis.Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # set while subscribed (tests and /health may look)
        self.reconnects = 0

    def subscribe(self, on_message: MessageCallback, on_reconnect: ReconnectCallback | None = None) -> None:
        self._on_message.append(on_message)
        if on_reconnect is not None:
            self._on_reconnect.append(on_reconnect)

    async def publish(self, signal: Signal) -> bool:
        """PUBLISH `signal`; False (logged) when Redis is unreachable: the reconcile timer covers it."""
        for attempt in (1, 2):  # a pooled connection may be dead (Redis restarted): once more on a fresh one
            if self._publisher is None:
                self._publisher = _client(self.url, connect_timeout=PUBLISH_CONNECT_TIMEOUT_S)
            try:
                await self._publisher.publish(self.channel, encode_signal(signal))
                return True
            except (redis.RedisError, OSError) as exc:
                publisher, self._publisher = self._publisher, None
                with contextlib.suppress(Exception):
                    await publisher.aclose()
                if attempt == 2:
                    logger.warning("could not publish %s on %s (%s); replicas catch up on their reconcile timer",
                                   signal.kind, self.channel, exc)  # fmt: skip
        return False

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="signal-bus-listener")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._publisher is not None:
            await self._publisher.aclose()
            self._publisher = None

    async def _listen(self) -> None:
        backoff = FIRST_BACKOFF_S
        lost = False  # the connection dropped (or never came up): hints may have been missed
        while True:
            client = _client(self.url)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.connected.set()
                backoff = FIRST_BACKOFF_S
                if lost:
                    self.reconnects += 1
                    logger.info("signal bus reconnected to %s; reconciling in case hints were lost", self.channel)
                    self._call(self._on_reconnect)
                else:
                    logger.info("signal bus listening on %s", self.channel)
                lost = False
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                if not lost:
                    logger.warning("signal bus lost %s (%s: %s); reconnecting with backoff",
                                   self.channel, type(exc).__name__, exc)  # fmt: skip
                lost = True
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _deliver(self, data: bytes) -> None:
        signal = decode_signal(data)
        if signal is None:
            logger.warning("ignored a message on %s that is not a signal: %r", self.channel, data[:200])
            return
        for callback in self._on_message:
            try:
                callback(signal)
            except Exception:  # noqa: BLE001 - one subscriber must not silence the others
                logger.exception("signal callback failed on %s", signal.kind)

    @staticmethod
    def _call(callbacks: list[ReconnectCallback]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001
                logger.exception("reconnect callback failed")


def _client(url: str, connect_timeout: float = CONNECT_TIMEOUT_S) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout,
        socket_timeout=None,  # the subscription waits for messages; get_message has its own timeout
        health_check_interval=HEALTH_CHECK_S,
        socket_keepalive=True,  # a peer gone without a word is noticed eventually; the timer covers meanwhile
    )


def publish_sync(url: str, channel: str, signal: Signal) -> bool:
    """PUBLISH from a worker (no event loop); False (logged) when Redis is unreachable."""
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S)
    try:
        client.publish(channel, encode_signal(signal))
        return True
    except (redis.RedisError, OSError) as exc:
        logger.warning("could not publish %s on %s (%s); replicas catch up on their reconcile timer",
                       signal.kind, channel, exc)  # fmt: skip
        return False
    finally:
        client.close()
