"""Engines and sessions: async for the app, sync for workers and the CLI.

`DATABASE_URL` takes the form users paste (`postgresql://user@host/db`, `postgres://...`); we pick
the driver (psycopg 3, which does both sync and async). Without it, SQLite in the store.
"""

from __future__ import annotations

import functools
import os
import weakref
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

ASYNC_POOL_OVERFLOW = 10
_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2", "postgresql+asyncpg")


def embedded_database_path(settings: Settings) -> Path:
    return settings.store.home / "mxext.db"


def database_url(settings: Settings, *, asynchronous: bool = False) -> URL:
    """The SQLAlchemy URL for `settings` with the driver this project uses."""
    raw = settings.control.database_url
    if not raw:
        path = embedded_database_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = f"sqlite:///{path}"
    try:
        url = make_url(raw)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises ArgumentError, but say it our way
        raise ValueError(f"DATABASE_URL={raw!r} is not a database URL (expected postgresql://user@host/db)") from exc
    if url.drivername in _PG_SCHEMES:
        return url.set(drivername="postgresql+psycopg")
    if url.drivername in ("sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"):
        return url.set(drivername="sqlite+aiosqlite" if asynchronous else "sqlite")
    raise ValueError(f"DATABASE_URL scheme {url.drivername!r} is not supported: use postgresql:// or sqlite:///")


def _sqlite_pragmas(engine: Engine) -> None:
    # WAL lets the server read while a worker writes; busy_timeout waits instead of failing at once.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


# Sync engines of this process. A process forked from it (Celery's prefork pool replacing a child,
# after a hard time limit for instance) must not use the parent's pooled connections: two processes
# on one Postgres socket corrupt each other's protocol state. After a fork the child forgets them
# (dispose(close=False) leaves the parent's sockets open for the parent) and opens its own.
_SYNC_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_inherited_connections() -> None:
    for engine in list(_SYNC_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def make_sync_engine(settings: Settings) -> Engine:
    url = database_url(settings)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        _sqlite_pragmas(engine)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
    _SYNC_ENGINES.add(engine)
    return engine


def make_async_engine(settings: Settings) -> AsyncEngine:
    url = database_url(settings, asynchronous=True)
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 10})
        _sqlite_pragmas(engine.sync_engine)
        return engine
    # MXEXT_DB_POOL_SIZE (default 10) connections, plus a few opened for a burst and closed after
    # it. The job API batches concurrent submissions and reads into shared statements, so 50 at
    # once use a handful; list and cancel take one each.
    pool_size = settings.control.db_pool_size
    return create_async_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=ASYNC_POOL_OVERFLOW)


@functools.lru_cache(maxsize=4)
def sync_sessions(settings: Settings) -> sessionmaker[Session]:
    """A process-wide sync session factory per settings (workers, CLI)."""
    return sessionmaker(make_sync_engine(settings), expire_on_commit=False)


def async_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
