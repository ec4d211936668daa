"""create_app(): the Litestar app on the in-process AsyncEngine.

The engine loads in the background after start-up (blocking work, off the event loop), so the
server answers /health 503 while it loads; `create_app_from_env` is the factory for running the
app under a granian command line (`granian --interface asgi --factory app.http.app:create_app_from_env`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from app.http import routes_adapters, routes_health, routes_jobs, routes_lora, routes_openai
from app.http.auth import api_key_middleware
from app.http.control import ControlPlane
from app.http.errors import EXCEPTION_HANDLERS
from app.http.request_id import request_id_middleware
from app.http.serve_cli import ServeConfig
from app.http.state import EngineFactory, ServerState
from app.settings import Settings, get_settings

logger = logging.getLogger("app.http")


def create_app(
    config: ServeConfig | None = None,
    engine_factory: EngineFactory | None = None,
    settings: Settings | None = None,
) -> Litestar:
    """The app for `config`; `engine_factory` (blocking, config -> engine) replaces the real loader in
    tests; `settings` (default: the environment's) says where the control plane lives."""
    config = config or ServeConfig()
    settings = settings or get_settings()
    state = ServerState(config, engine_factory)
    control = ControlPlane(settings)
    # control-plane wiring: the signal bus, the job dispatcher and the background services
    # (each line belongs to the module it names).
    from app.http.reconciler import AdapterReconciler
    from app.signals import make_bus

    control.bus = make_bus(settings)
    control.services += [control.bus, AdapterReconciler(state, control)]

    from app.jobs.dispatch import make_dispatcher

    control.jobs = make_dispatcher(settings)
    control.services.append(control.jobs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(state.load())
        await control.start()
        try:
            yield
        finally:
            state.draining = True
            await control.stop()
            if not loading.done():
                await asyncio.wait({loading}, timeout=1.0)
            await asyncio.to_thread(state.shutdown_engine)

    app = Litestar(
        route_handlers=[*routes_health.ROUTES, *routes_openai.ROUTES, *routes_lora.ROUTES, *routes_jobs.ROUTES,
                        *routes_adapters.ROUTES],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="vllm-mxext",
            version=routes_health.server_version(),
            description="OpenAI-compatible inference API (vLLM's extras included). Errors: {error: {message, type, param, code}}.",
            path="/docs",
        ),
        logging_config=None,
    )
    app.state.server = state
    app.state.control = control
    # Around Litestar's whole handler, not per route: unknown paths get the id (and the key check) too.
    handler = app.asgi_handler
    admin_key = state.lora.settings.admin_key
    if config.api_key or admin_key:
        handler = api_key_middleware(config.api_key, admin_key)(handler)
    app.asgi_handler = request_id_middleware(handler)
    return app


def create_app_from_env() -> Litestar:
    """Factory for granian's command line: settings from MXEXT_SERVE_* (see serve_cli.ServeConfig)."""
    from app.logging import configure_logging

    configure_logging(get_settings().logging)
    return create_app(ServeConfig.from_env())
