"""`mxext db upgrade|downgrade|current|revision`: Alembic, configured in code so no alembic.ini is
needed and the URL comes from the project's settings (DATABASE_URL, else SQLite in the store)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alembic import command
from alembic.config import Config

from app.db.session import database_url
from app.settings import Settings, get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(settings: Settings | None = None) -> Config:
    settings = settings or get_settings()
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"migrations not found at {MIGRATIONS_DIR}: install the project from its source tree")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation treats % specially: escape it in passwords.
    url = database_url(settings).render_as_string(hide_password=False).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", url)
    return config


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(settings), revision)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("db", help="control-plane database: migrations (DATABASE_URL, else SQLite in the store)")
    db_sub = parser.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="apply migrations up to REVISION (default head)")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=lambda a: upgrade(revision=a.revision))
    down = db_sub.add_parser("downgrade", help="revert migrations down to REVISION (e.g. -1, base)")
    down.add_argument("revision")
    down.set_defaults(func=lambda a: downgrade(revision=a.revision))
    cur = db_sub.add_parser("current", help="show the applied revision")
    cur.set_defaults(func=lambda a: command.current(alembic_config(), verbose=True) or 0)
    rev = db_sub.add_parser("revision", help="(developers) autogenerate a migration from app.db.models")
    rev.add_argument("-m", "--message", required=True)
    rev.set_defaults(func=lambda a: bool(command.revision(alembic_config(), message=a.message, autogenerate=True)) and 0)
