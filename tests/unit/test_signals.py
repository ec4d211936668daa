"""Signals: the wire format, the in-process bus (thread-safe, process-wide) and the bus choice."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.settings import ControlPlaneSettings, Settings
from app.signals import (
    ADAPTERS_CHANGED,
    Signal,
    decode_signal,
    encode_signal,
    make_bus,
    make_signal,
    publish_adapters_changed_sync,
)
from app.signals.inprocess import InProcessBus, InProcessHub


def test_signal_round_trip_and_garbage():
    signal = make_signal(ADAPTERS_CHANGED, "registered a v1")
    assert decode_signal(encode_signal(signal)) == signal
    assert signal.sender and abs(signal.sent_at - time.time()) < 5
    assert decode_signal(b'{"kind": "adapters-changed"}') == Signal(kind="adapters-changed")
    for garbage in (b"", b"hello", b"[1]", b'{"reason": "no kind"}'):
        assert decode_signal(garbage) is None


async def test_in_process_bus_delivers_on_the_subscribers_loop_from_any_thread():
    hub = InProcessHub()
    bus = InProcessBus(hub)
    got: list[tuple[str, int]] = []
    bus.subscribe(lambda s: got.append((s.reason, threading.get_ident())))
    await bus.start()
    late: list[Signal] = []
    bus.subscribe(late.append)  # after start: still subscribed
    thread = threading.Thread(target=hub.publish, args=(make_signal(ADAPTERS_CHANGED, "from a worker"),))
    thread.start()
    thread.join()
    await bus.publish(make_signal(ADAPTERS_CHANGED, "from the loop"))
    await asyncio.sleep(0.05)
    assert [reason for reason, _ in got] == ["from a worker", "from the loop"]
    assert {ident for _, ident in got} == {threading.get_ident()}
    assert len(late) == 2
    await bus.stop()
    hub.publish(make_signal(ADAPTERS_CHANGED, "after stop"))
    await asyncio.sleep(0.05)
    assert len(got) == 2


async def test_embedded_publish_reaches_the_process_wide_bus():
    settings = Settings()
    assert not settings.control.redis_url
    bus = make_bus(settings)
    assert isinstance(bus, InProcessBus)
    got: list[Signal] = []
    bus.subscribe(got.append)
    await bus.start()
    try:
        await asyncio.to_thread(publish_adapters_changed_sync, settings, "job 1 finished")
        await asyncio.sleep(0.05)
        assert [(s.kind, s.reason) for s in got] == [(ADAPTERS_CHANGED, "job 1 finished")]
    finally:
        await bus.stop()


async def test_redis_bus_choice_and_a_publish_to_nowhere_is_false_not_an_error(monkeypatch):
    from app.signals.redis_bus import RedisBus

    settings = Settings(control=ControlPlaneSettings(redis_url="redis://127.0.0.1:1/0", signal_channel="mxext:test:channel"))
    bus = make_bus(settings)
    assert isinstance(bus, RedisBus) and bus.channel == "mxext:test:channel"
    started = time.monotonic()
    assert await bus.publish(make_signal(ADAPTERS_CHANGED)) is False
    assert publish_adapters_changed_sync(settings, "x") is False
    assert time.monotonic() - started < 5
    await bus.stop()


@pytest.mark.parametrize("channel", ["", "  "])
def test_default_channel(monkeypatch, channel):
    from app.signals import signal_channel

    monkeypatch.setenv("MXEXT_SIGNAL_CHANNEL", channel)
    assert signal_channel(Settings(control=ControlPlaneSettings.from_env())) == "mxext:signals"
    monkeypatch.setenv("MXEXT_SIGNAL_CHANNEL", "mine")
    assert signal_channel(Settings(control=ControlPlaneSettings.from_env())) == "mine"
