"""API-key check: with a key set, model routes need `Authorization: Bearer <key>`; health stays open.

Open without a key: /health, /v1/health/*, /metrics, /version and the OpenAPI schema (what load
balancers, Prometheus and humans reading the docs need). Everything under /v1 and the tokenizer
routes need the key.
"""

from __future__ import annotations

import hmac
from typing import Any

from app.http.asgi import send_error

PROTECTED_EXACT = frozenset({"/tokenize", "/detokenize"})
OPEN_PREFIXES = ("/v1/health/",)


def needs_key(path: str) -> bool:
    if path.startswith(OPEN_PREFIXES):
        return False
    return path.startswith("/v1/") or path == "/v1" or path in PROTECTED_EXACT


def _presented_key(scope: Any) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
            return None
    return None


def api_key_middleware(api_key: str) -> Any:
    """ASGI middleware factory (Litestar calls it with the next app)."""
    expected = api_key.encode()

    def factory(app: Any) -> Any:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] != "OPTIONS" and needs_key(scope["path"]):
                presented = _presented_key(scope)
                if presented is None or not hmac.compare_digest(presented.encode(), expected):
                    message = (
                        "Missing API key: send `Authorization: Bearer <key>`"
                        if presented is None
                        else "Incorrect API key provided"
                    )
                    await send_error(
                        send, 401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                    )
                    return
            await app(scope, receive, send)

        return middleware

    return factory
