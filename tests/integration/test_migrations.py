"""Alembic on the real Postgres: upgrade → downgrade → upgrade, and the models match the migrations."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from app.db.migrate import alembic_config, downgrade, upgrade
from app.db.session import database_url
from app.settings import ControlPlaneSettings, Settings
from tests.conftest import POSTGRES_ADMIN_URL

TABLES = {"jobs", "model_artifacts", "lora_adapters", "replica_adapters", "benchmark_runs"}


@pytest.fixture
def empty_database():
    name = f"mxext_migrate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield Settings(control=ControlPlaneSettings(database_url=f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"))
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tables(settings: Settings) -> set[str]:
    engine = create_engine(database_url(settings))
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_database):
    upgrade(empty_database)
    assert tables(empty_database) == TABLES
    command.check(alembic_config(empty_database))  # the models and the migrations agree
    downgrade(empty_database, "base")
    assert tables(empty_database) == set()
    upgrade(empty_database)
    assert tables(empty_database) == TABLES
