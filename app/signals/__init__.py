"""Signals between the control plane's processes: hints that the desired state in Postgres changed.

With REDIS_URL, hints travel on one Redis pub/sub channel (MXEXT_SIGNAL_CHANNEL, default
`mxext:signals`); without it (the embedded default) on a process-wide in-process bus, which the
embedded job runner shares with the server it runs in. Hints only: receivers re-read Postgres, and
a reconcile timer covers any hint that is lost.
"""

from __future__ import annotations


from app.settings import Settings
from app.signals.base import SignalBus
from app.signals.inprocess import HUB, InProcessBus
from app.signals.messages import ADAPTERS_CHANGED, Signal, decode_signal, encode_signal, make_signal

DEFAULT_CHANNEL = "mxext:signals"

__all__ = [
    "ADAPTERS_CHANGED",
    "Signal",
    "SignalBus",
    "decode_signal",
    "encode_signal",
    "make_bus",
    "make_signal",
    "publish_adapters_changed_sync",
    "signal_channel",
]


def signal_channel(settings: Settings) -> str:
    """The pub/sub channel (settings.control.signal_channel, MXEXT_SIGNAL_CHANNEL): channels span
    Redis db indexes, so deployments or test runs that share one Redis server need names of their own."""
    return settings.control.signal_channel.strip() or DEFAULT_CHANNEL


def make_bus(settings: Settings) -> SignalBus:
    """The server's bus: Redis when REDIS_URL is set, else the process's in-process bus."""
    if settings.control.redis_url:
        from app.signals.redis_bus import RedisBus

        return RedisBus(settings.control.redis_url, signal_channel(settings))
    return InProcessBus(HUB)


def publish_adapters_changed_sync(settings: Settings, reason: str) -> bool:
    """Tell every server that the desired adapters changed (workers call it after committing).
    Never raises: False when the hint could not be sent; the reconcile timer covers that."""
    signal = make_signal(ADAPTERS_CHANGED, reason)
    if settings.control.redis_url:
        from app.signals.redis_bus import publish_sync

        return publish_sync(settings.control.redis_url, signal_channel(settings), signal)
    HUB.publish(signal)
    return True
