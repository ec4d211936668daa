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
from app.jobs import store
from app.jobs.coalesce import Coalescer
from app.settings import Settings

logger = logging.getLogger("app.http")


BATCH = 100  # submissions per INSERT, reads per SELECT


def _stopping() -> APIError:
    return APIError(503, "the server is shutting down; submit the job again", code="control_plane_unavailable")


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
        # Concurrent submissions share one INSERT (app.jobs.coalesce); set once the database is up.
        self._intake: Coalescer[store.NewJob, store.CreateResult] | None = None
        self._reads: Coalescer[str, store.JobRecord] | None = None  # concurrent GETs by id: one SELECT

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
            self._intake = Coalescer(self._create_jobs, max_batch=BATCH, stopped=_stopping)
            self._reads = Coalescer(self._get_jobs, max_batch=BATCH, stopped=_stopping)
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
        for coalescer in (self._intake, self._reads):
            if coalescer is not None:
                await coalescer.close()
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:  # noqa: BLE001
                logger.exception("control-plane service %s failed to stop", type(service).__name__)
        if self.engine is not None:
            await self.engine.dispose()

    async def create_job(self, job: store.NewJob) -> store.CreateResult:
        """(job, created) for a submission, batched with the others in flight; JobConflict for an
        idempotency key that holds other parameters."""
        self.require_sessions()
        assert self._intake is not None
        return await self._intake.submit(job)

    async def get_job(self, job_id: str) -> store.JobRecord:
        """The job (JobNotFound for an unknown id), read together with the other reads in flight."""
        self.require_sessions()
        assert self._reads is not None
        return await self._reads.submit(job_id)

    async def _create_jobs(self, jobs: list[store.NewJob]) -> list[store.CreateResult | Exception]:
        assert self.sessions is not None
        return await store.create_jobs(self.sessions, jobs)

    async def _get_jobs(self, job_ids: list[str]) -> list[store.JobRecord | store.JobNotFound]:
        assert self.sessions is not None
        return await store.get_jobs(self.sessions, job_ids)

    def require_sessions(self) -> async_sessionmaker[AsyncSession]:
        if self.sessions is None:
            reason = self.error or "starting up"
            raise APIError(503, f"the control plane is unavailable: {reason}", code="control_plane_unavailable")
        return self.sessions
