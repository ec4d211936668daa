"""API-key check: with a key set, model routes need `Authorization: Bearer <key>`; health stays open.

Open without a key: /health, /v1/health/*, /metrics, /version and the OpenAPI schema (what load
balancers, Prometheus and humans reading the docs need). Everything under /v1 and the tokenizer
routes need the key.

With an admin key set, the adapter load/unload routes, the job API (/v1/jobs...) and the fleet
adapter API (/v1/adapters...) need it (the API key there is a 403), and the admin key is also
accepted wherever the API key is.
"""

from __future__ import annotations

import hmac
from typing import Any

from app.http.asgi import send_error

PROTECTED_EXACT = frozenset({"/tokenize", "/detokenize"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ADMIN_PREFIXES = ("/v1/jobs", "/v1/adapters")  # whole trees: /v1/jobs/{id}/cancel, /v1/adapters/{name}, ...


def is_admin_path(path: str) -> bool:
    return path in ADMIN_PATHS or any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES)


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


def _matches(presented: str | None, key: str | None) -> bool:
    return presented is not None and key is not None and hmac.compare_digest(presented.encode(), key.encode())


async def _refuse(send: Any, status: int, message: str) -> None:
    code = "invalid_api_key" if status == 401 else "insufficient_permissions"
    await send_error(send, status, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def api_key_middleware(api_key: str | None, admin_key: str | None = None) -> Any:
    """ASGI middleware factory (Litestar calls it with the next app)."""

    def factory(app: Any) -> Any:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] != "OPTIONS":
                path = scope["path"]
                if admin_key and is_admin_path(path):
                    presented = _presented_key(scope)
                    if not _matches(presented, admin_key):
                        if presented is None:
                            await _refuse(send, 401, "Missing admin key: send `Authorization: Bearer <admin key>`")
                        elif _matches(presented, api_key):
                            await _refuse(send, 403, f"{path} needs the admin key; the API key is not enough")
                        else:
                            await _refuse(send, 401, "Incorrect admin key provided")
                        return
                elif api_key and needs_key(path):
                    presented = _presented_key(scope)
                    if not (_matches(presented, api_key) or _matches(presented, admin_key)):
                        message = (
                            "Missing API key: send `Authorization: Bearer <key>`"
                            if presented is None
                            else "Incorrect API key provided"
                        )
                        await _refuse(send, 401, message)
                        return
            await app(scope, receive, send)

        return middleware

    return factory
