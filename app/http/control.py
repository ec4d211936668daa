"""The server's handle on the control plane: database sessions, the signal bus, the job dispatcher
and the background services (adapter reconciler, embedded job runner).

Inference never depends on it: if the database is unreachable the server still serves completions,
and the control-plane routes answer 503 with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db.session import async_sessions, database_url, make_async_engine
from app.http.errors import APIError
from app.settings import Settings

logger = logging.getLogger("app.http")


class BackgroundService(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class ControlPlane:
    """Lives on `app.state.control`. Services are started in order after the database is up and
    stopped in reverse order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.sessions: async_sessionmaker[AsyncSession] | None = None
        self.error: str | None = None
        self.bus: Any = None  # app.signals bus (Redis or in-process), set by create_app
        self.jobs: Any = None  # app.jobs dispatcher (Celery or embedded), set by create_app
        self.services: list[BackgroundService] = []

    async def start(self) -> None:
        try:
            if database_url(self.settings).get_backend_name() == "sqlite":
                # A SQLite file (the embedded default, or one named in DATABASE_URL) is this
                # server's own to migrate; a shared database is migrated by `mxext db upgrade`
                # (make serve, the compose stack), never behind an operator's back.
                from app.db.migrate import upgrade

                await asyncio.to_thread(upgrade, self.settings)
            self.engine = make_async_engine(self.settings)
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            self.sessions = async_sessions(self.engine)
        except Exception as exc:  # noqa: BLE001 - inference still serves; the routes report it
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("control plane unavailable (jobs and /v1/adapters answer 503): %s", self.error)
            return
        for service in self.services:
            try:
                await service.start()
            except Exception:  # noqa: BLE001 - one service failing must not stop the server
                logger.exception("control-plane service %s failed to start", type(service).__name__)

    async def stop(self) -> None:
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:  # noqa: BLE001
                logger.exception("control-plane service %s failed to stop", type(service).__name__)
        if self.engine is not None:
            await self.engine.dispose()

    def require_sessions(self) -> async_sessionmaker[AsyncSession]:
        if self.sessions is None:
            reason = self.error or "starting up"
            raise APIError(503, f"the control plane is unavailable: {reason}", code="control_plane_unavailable")
        return self.sessions
