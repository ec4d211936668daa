"""The embedded granian server: real sockets, a fake engine, SIGTERM past the shutdown timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import httpx

from app.http import server
from app.http.serve_cli import ServeConfig
from app.http.testing import FakeEngine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_sigterm_past_the_timeout_aborts_in_flight_and_exits_0():
    port = free_port()
    engine = FakeEngine(max_model_len=4096, step_delay=0.01)
    config = ServeConfig(host="127.0.0.1", port=port, model="fake", shutdown_timeout=0.3)
    serving = asyncio.ensure_future(server.serve(config, engine_factory=lambda _: engine))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for _ in range(200):
            try:
                if (await client.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.02)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
        long_request = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        while not engine.running:
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        answer = await long_request
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["finish_reason"] == "abort"
    assert await asyncio.wait_for(serving, 10) == 0
    assert engine.is_shut_down and not engine.running
