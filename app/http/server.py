"""Run the app under granian, embedded in this process, and shut down gracefully on SIGTERM/SIGINT.

Embedding keeps the signals ours: on the first SIGTERM (or Ctrl-C) the server keeps listening but
answers new generation requests 503 (and /health 503) while in-flight ones finish, for up to the
shutdown timeout; what is still running then is aborted (its clients get finish_reason "abort"),
granian stops, the engine thread stops, and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import NoReturn

from app.http.serve_cli import ServeConfig
from app.http.state import EngineFactory

logger = logging.getLogger("app.http")

# After aborting what outlived the shutdown timeout, how long its responses get to flush.
ABORT_FLUSH_SECONDS = 2.0


def run(config: ServeConfig) -> NoReturn:
    """Serve until a signal, then exit: 0 after a clean shutdown, 1 when the model failed to load."""
    from app.logging import configure_logging
    from app.settings import get_settings

    configure_logging(get_settings().logging)
    exit_code = asyncio.run(serve(config))
    # Leave without interpreter teardown: granian's Rust threads can panic (and abort the process)
    # when Python finalizes under them, turning a clean shutdown into SIGABRT. All is done by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


async def serve(config: ServeConfig, engine_factory: EngineFactory | None = None) -> int:
    """Serve `config` until SIGTERM/SIGINT; `engine_factory` replaces the real loader in tests."""
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    from app.http.app import create_app

    app = create_app(config, engine_factory)
    state = app.state.server
    server = Server(
        app,
        address=config.host,
        port=config.port,
        interface=Interfaces.ASGI,
        log_level=LogLevels.error,  # our own lines say where we listen; granian's embed warning is noise
        log_access=False,
        websockets=False,
    )
    loop = asyncio.get_running_loop()
    exit_code = 0
    stopping = False
    background: set[asyncio.Task[None]] = set()

    async def shut_down_gracefully() -> None:
        if not await state.drain(config.shutdown_timeout):
            state.abort_all()
            await state.drain(ABORT_FLUSH_SECONDS)
        logger.info("stopping the server")
        server.stop()

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping:
            logger.warning("%s again: stopping now", signal.Signals(signum).name)
            state.abort_all()
            server.stop()
            return
        stopping = True
        logger.info("%s: refusing new requests, finishing those in flight", signal.Signals(signum).name)
        task = loop.create_task(shut_down_gracefully())
        background.add(task)
        task.add_done_callback(background.discard)

    def on_fatal(reason: str) -> None:
        nonlocal exit_code
        exit_code = 1
        logger.error("cannot serve: %s", reason)
        server.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    state.on_fatal = on_fatal
    logger.info(
        "serving %s on http://%s:%d (OpenAI API under /v1, docs at /docs)",
        ", ".join(state.served_names), config.host, config.port,
    )  # fmt: skip
    try:
        await server.serve()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    logger.info("server stopped")
    return exit_code
