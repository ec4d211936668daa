"""Health, version, metrics and the OpenAPI schema: the routes that stay open without an API key."""

from __future__ import annotations

import functools
from importlib import metadata

from litestar import MediaType, Request, Response, get

from app.http.errors import error_body
from app.http.metrics import CONTENT_TYPE
from app.http.openapi import openapi_document
from app.http.schemas import ErrorResponse, HealthResponse, VersionResponse
from app.http.state import ServerState


def _state(request: Request) -> ServerState:
    return request.app.state.server


@functools.cache
def server_version() -> str:
    try:
        return metadata.version("vllm-mxext")
    except metadata.PackageNotFoundError:
        return "0.1.0"


@get("/health", summary="200 when ready to serve; 503 while loading or shutting down", sync_to_thread=False)
def health(request: Request) -> Response[ErrorResponse | None]:
    state = _state(request)
    if state.ready:
        return Response(None, status_code=200)
    return Response(
        error_body(503, state.not_ready_reason()), status_code=503, headers={"Retry-After": "5"}
    )


@get("/v1/health/live", summary="200 while the process is up", sync_to_thread=False)
def health_live() -> HealthResponse:
    return HealthResponse(message="Service is live.")


@get("/v1/health/ready", summary="200 when ready to serve; 503 while loading or shutting down", sync_to_thread=False)
def health_ready(request: Request) -> Response[HealthResponse]:
    state = _state(request)
    if state.ready:
        return Response(HealthResponse(message="Service is ready."), status_code=200)
    return Response(
        HealthResponse(message=f"Service is not ready: {state.not_ready_reason()}."),
        status_code=503,
        headers={"Retry-After": "5"},
    )


@get("/version", summary="The server's version", sync_to_thread=False)
def version() -> VersionResponse:
    return VersionResponse(version=server_version())


@get("/metrics", summary="Prometheus metrics (vLLM's names)", media_type=MediaType.TEXT, sync_to_thread=False)
def metrics(request: Request) -> Response[bytes]:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@get("/openapi.json", summary="The OpenAPI schema", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request) -> Response[dict]:
    document = getattr(request.app.state, "openapi_document", None)
    if document is None:
        document = request.app.state.openapi_document = openapi_document(request.app.openapi_schema.to_schema())
    return Response(document)


ROUTES = [health, health_live, health_ready, version, metrics, openapi_json]
