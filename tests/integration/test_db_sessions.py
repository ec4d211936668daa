"""Sync database sessions across a fork (Celery's prefork pool forks new children from a parent
that may have used the database): the child opens connections of its own."""

from __future__ import annotations

import os

from sqlalchemy import text

from app.db.session import make_sync_engine
from app.settings import ControlPlaneSettings, Settings


def test_a_forked_child_uses_its_own_connection_and_the_parent_keeps_its_own(postgres_url):
    engine = make_sync_engine(Settings(control=ControlPlaneSettings(database_url=postgres_url)))
    try:
        with engine.connect() as conn:
            parent_backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        # the pool now holds the parent's connection; a child must not pick it up
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its backend pid (or -1 on any error), then leave at once
            try:
                with engine.connect() as conn:
                    child_backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                os.write(write, str(child_backend).encode())
            except BaseException:  # noqa: BLE001
                os.write(write, b"-1")
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        child_backend = int(os.read(read, 64).decode())
        os.close(read)
        assert child_backend not in (-1, parent_backend)
        with engine.connect() as conn:  # the parent's pooled connection still works after the child
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_backend
    finally:
        engine.dispose()
