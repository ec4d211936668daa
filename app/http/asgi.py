"""Answers written straight to ASGI, for middleware that runs before Litestar's routing."""

from __future__ import annotations

from typing import Any

import msgspec

from app.http.errors import error_body


async def send_error(
    send: Any,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """An OpenAI-shaped JSON error response."""
    body = msgspec.json.encode(error_body(status, message, param=param, code=code))
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
