"""The OpenAI-compatible HTTP server: a Litestar app on the in-process AsyncEngine, served by granian.

Importing this package is cheap on purpose (`app.cli` imports `app.http.serve_cli` for every
subcommand); the app itself lives in `app.http.app`.
"""
