"""The messages on the signal channel. They are hints that Postgres changed, never the change itself:
a receiver re-reads the truth from the database, so a lost or duplicated message costs nothing."""

from __future__ import annotations

import os
import socket
import time

import msgspec

ADAPTERS_CHANGED = "adapters-changed"


class Signal(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # what changed, e.g. "adapters-changed"
    reason: str = ""  # for the logs: "registered tuned-1", "job 5f0c... finished"
    sent_at: float = 0.0  # time.time() at the sender
    sender: str = ""  # host:pid of the sender


def this_sender() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def make_signal(kind: str, reason: str = "") -> Signal:
    return Signal(kind=kind, reason=reason, sent_at=time.time(), sender=this_sender())


def encode_signal(signal: Signal) -> bytes:
    return msgspec.json.encode(signal)


def decode_signal(data: bytes | str) -> Signal | None:
    """The signal in `data`, or None when it is not one of ours (logged by the caller)."""
    try:
        return msgspec.json.decode(data, type=Signal)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
