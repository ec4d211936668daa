"""Shared fixtures: the real embedded model (converted once into the store) and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"

# The suite shares the user's model store (the converted model), but never its control-plane
# database: servers the tests start (in-process apps and subprocesses alike) would otherwise write
# the jobs they are sent, schemathesis' fuzzed ones included, into ~/.cache/mxext/mxext.db. Tests
# that want Postgres or an embedded store of their own pass their settings explicitly.
if not os.environ.get("DATABASE_URL"):
    import tempfile

    _TEST_DB_DIR = tempfile.mkdtemp(prefix="mxext-test-db-")
    os.environ["DATABASE_URL"] = f"sqlite:///{_TEST_DB_DIR}/mxext.db"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def store_home() -> Path:
    """The model store the tests use: MXEXT_HOME or the default, so CI converts the GGUF once."""
    return Path(os.environ.get("MXEXT_HOME") or "~/.cache/mxext").expanduser()


@pytest.fixture(scope="session")
def smollm2_dir(store_home: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder in the store (converted from the GGUF if missing)."""
    from app.hub.store import ModelStore

    return ModelStore(store_home).resolve(DEFAULT_MODEL)


# ---- control plane: a real Postgres and Redis (this machine runs both; .ci/run starts them) ----

POSTGRES_ADMIN_URL = os.environ.get("MXEXT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("MXEXT_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture(scope="session")
def new_postgres_database():
    """A factory: each call makes a fresh database on the machine's Postgres, migrated to head, and
    returns its URL in the plain `postgresql://user@host/db` form users paste into DATABASE_URL.
    Every database made is dropped at the end of the session."""
    import uuid

    import psycopg

    from app.db.migrate import upgrade
    from app.settings import ControlPlaneSettings, Settings

    made: list[str] = []

    def make() -> str:
        name = f"mxext_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        url = f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
        upgrade(Settings(control=ControlPlaneSettings(database_url=url)))
        return url

    yield make
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url(new_postgres_database):
    """The session's shared database (see new_postgres_database); modules whose assertions cover a
    whole table take one of their own instead."""
    return new_postgres_database()


@pytest.fixture(scope="session")
def redis_url():
    """A Redis database index of this session's own (1-15), so concurrent runs do not share
    Celery queues or hint channels."""
    import random

    import redis

    index = random.randint(1, 15)
    url = f"{REDIS_TEST_URL}/{index}"
    client = redis.Redis.from_url(url)
    client.ping()
    client.close()
    return url


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """A redis-server of the module's own (tests/integration/jobs_support.RedisServer), which its
    tests may kill and start again; skipped where redis-server is not installed."""
    import shutil

    from tests.integration.jobs_support import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
