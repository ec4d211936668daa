"""X-Request-Id: accepted from the client (or made up), echoed on every response."""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Request

from app.http.asgi import send_error

SCOPE_KEY = "mxext.request_id"
MAX_LENGTH = 256


def _valid(value: str) -> bool:
    return 0 < len(value) <= MAX_LENGTH and all(0x21 <= ord(c) <= 0x7E for c in value)


def request_id_of(request: Request) -> str:
    """The id of this request (set by the middleware; a fresh one when the middleware is absent)."""
    rid = request.scope.get(SCOPE_KEY)
    if rid is None:
        rid = request.scope[SCOPE_KEY] = uuid.uuid4().hex
    return rid


def request_id_middleware(app: Any) -> Any:
    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        if given is not None and not _valid(given):
            await send_error(
                send, 400, f"X-Request-Id must be 1 to {MAX_LENGTH} visible ASCII characters", param="X-Request-Id"
            )
            return
        rid = given or uuid.uuid4().hex
        scope[SCOPE_KEY] = rid
        header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        await app(scope, receive, send_with_id)

    return middleware
