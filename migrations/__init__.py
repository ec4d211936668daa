"""Alembic migrations for app.db (run with `mxext db upgrade`)."""
