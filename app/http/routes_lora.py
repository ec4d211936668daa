"""LoRA adapters at runtime, as vLLM serves them: load, unload, list.

`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` answer vLLM's way (200 and a
one-line text; errors in OpenAI's shape) and exist only with runtime updating on
(VLLM_ALLOW_RUNTIME_LORA_UPDATING or the config file's enable_dynamic_loading); the admin key,
when set, guards them (app.http.auth). A path is checked against the allowed roots before the
engine reads it (app.adapters.security); the engine's own checks (format, rank, pickles) answer
400 with its message.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from litestar import MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from app.adapters.lora_config import ADAPTER_NAME_PATTERN, ADAPTER_NAME_RULE
from app.adapters.security import AdapterPathError, check_adapter_path
from app.http.errors import APIError, bad_request
from app.http.schemas import (
    ErrorResponse,
    LoadLoRAAdapterRequest,
    LoRAAdapterCard,
    LoRAAdapterList,
    UnloadLoRAAdapterRequest,
)
from app.http.state import ServerState

logger = logging.getLogger("app.http")

DISABLED = "runtime LoRA updating is disabled; set VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"
ADMIN_RESPONSES = {
    400: ResponseSpec(ErrorResponse, description="A bad name or path, or an adapter the engine refuses (says why)"),
    401: ResponseSpec(ErrorResponse, description="Missing or wrong key"),
    403: ResponseSpec(ErrorResponse, description="Runtime updating is off, or the admin key is needed"),
    404: ResponseSpec(ErrorResponse, description="Unload: no adapter of that name"),
    503: ResponseSpec(ErrorResponse, description="Loading or shutting down; see Retry-After"),
}


def _state(connection: ASGIConnection) -> ServerState:
    return connection.app.state.server


async def runtime_updating_on(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard (runs before the body is read): 403 unless runtime LoRA updating is on."""
    if not _state(connection).lora.settings.allow_runtime_updating:
        raise APIError(403, DISABLED, code="runtime_lora_updating_disabled")


def _check_name(state: ServerState, name: str) -> None:
    if not re.fullmatch(ADAPTER_NAME_PATTERN, name):
        raise bad_request(f"lora_name {name!r} is not a valid adapter name: {ADAPTER_NAME_RULE}", param="lora_name")
    if state.is_base(name):
        raise bad_request(f"lora_name {name!r} is the base model's name; choose another", param="lora_name")


@post(
    "/v1/load_lora_adapter",
    summary="Load (or replace) a LoRA adapter from a folder inside the allowed roots",
    guards=[runtime_updating_on],
    status_code=200,
    media_type=MediaType.TEXT,
    responses=ADMIN_RESPONSES,
)
async def load_lora_adapter(request: Request, data: JSONBody[LoadLoRAAdapterRequest]) -> Response[str]:
    state = _state(request)
    engine = state.require_engine()
    name = data.lora_name
    _check_name(state, name)
    try:
        path = await asyncio.to_thread(check_adapter_path, data.lora_path, state.lora.roots)
    except AdapterPathError as exc:
        raise bad_request(str(exc), param="lora_path") from None
    async with state.lora_loads:
        try:
            info = await asyncio.to_thread(engine.add_lora, name, str(path))
        except (ValueError, OSError) as exc:  # FileNotFoundError included: the engine's message says what
            logger.warning("loading adapter %s from %s refused: %s", name, path, exc)
            raise bad_request(f"Loading LoRA adapter '{name}' failed: {exc}", param="lora_path") from None
    logger.info(
        "adapter %s loaded from %s (rank %s, version %s, tier %s)", name, path,
        getattr(info, "rank", "?"), getattr(info, "version", "?"), getattr(info, "tier", "?"),
    )  # fmt: skip
    return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type=MediaType.TEXT)


@post(
    "/v1/unload_lora_adapter",
    summary="Unload a LoRA adapter (requests in flight on it finish)",
    guards=[runtime_updating_on],
    status_code=200,
    media_type=MediaType.TEXT,
    responses=ADMIN_RESPONSES,
)
async def unload_lora_adapter(request: Request, data: JSONBody[UnloadLoRAAdapterRequest]) -> Response[str]:
    state = _state(request)
    engine = state.require_engine()
    name = data.lora_name
    if not await asyncio.to_thread(engine.remove_lora, name):
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="adapter_not_found")
    logger.info("adapter %s unloaded", name)
    return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type=MediaType.TEXT)


def adapter_card(info: Any) -> LoRAAdapterCard:
    return LoRAAdapterCard(
        name=info.name,
        path=str(info.path),
        format="peft",
        rank=info.rank,
        target_modules=list(info.target_modules),
        version=info.version,
        tier=info.tier,
        loaded_at=info.loaded_at,
        requests_served=info.requests_served,
    )


@get("/v1/lora_adapters", summary="The loaded LoRA adapters", responses=ADMIN_RESPONSES)
async def list_lora_adapters(request: Request) -> LoRAAdapterList:
    state = _state(request)
    state.require_engine()
    return LoRAAdapterList(data=[adapter_card(info) for info in sorted(state.loras(), key=lambda i: i.name)])


ROUTES = [load_lora_adapter, unload_lora_adapter, list_lora_adapters]
