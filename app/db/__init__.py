"""Control-plane state: SQLAlchemy models and sessions (async for the app, sync for workers).

Postgres in a deployment, SQLite in the store when DATABASE_URL is unset (the embedded default)."""
