"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every error a client can cause is an `APIError` with a message that says what to change; anything
else that escapes a handler is our own fault and becomes a 500 (logged with its traceback).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
import sqlalchemy.exc
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from app.http.schemas import ErrorInfo, ErrorResponse

logger = logging.getLogger("app.http")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(retry_after)})


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> ErrorResponse:
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code))


def error_response(error: APIError) -> Response[ErrorResponse]:
    return Response(error.body(), status_code=error.status, headers=error.headers)


def describe_validation(exc: ValidationException) -> tuple[str, str | None]:
    """The message and param of a body that did not decode into the request type."""
    details = exc.extra if isinstance(exc.extra, list) else []
    item = next((d for d in details if isinstance(d, dict) and d.get("message")), None)
    if item is None:
        return "The request body does not match this endpoint's schema; see /openapi.json", None
    message = str(item["message"])
    key = item.get("key")
    if key == "data" and message == "'data'":  # no body at all
        return "The request body is empty; send a JSON object", None
    param = None if key in (None, "", "data") else str(key)
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", message)
    if unknown:
        name = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
        return f"Unrecognized request argument supplied: {name}", name
    if param:
        message = f"{message} at `{param}`"
    return message, param


_JSON_ERROR = re.compile(r"^(JSON is malformed|Input data was truncated|Invalid)")


def handle_api_error(request: Request, exc: APIError) -> Response[ErrorResponse]:
    return error_response(exc)


def handle_http_exception(request: Request, exc: HTTPException) -> Response[ErrorResponse]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        message, param = describe_validation(exc)
        return Response(error_body(400, message, param=param), status_code=400)
    if status >= 500:
        logger.error("HTTP %s on %s %s: %s", status, request.method, request.url.path, exc.detail)
        return Response(error_body(status, "Internal server error"), status_code=status)
    message = str(exc.detail)
    if status == 400 and (isinstance(exc.__cause__, msgspec.DecodeError) or _JSON_ERROR.match(message)):
        message = f"The request body is not valid JSON ({message}); send a JSON object"
    elif status == 413:
        message = f"The request body is too large: {message}. Send a smaller body."
    elif status == 404:
        message = f"No route {request.method} {request.url.path}; see /openapi.json for the routes."
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    return Response(error_body(status, message), status_code=status, headers=exc.headers)


def handle_internal_error(request: Request, exc: Exception) -> Response[ErrorResponse]:
    logger.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(error_body(500, f"Internal server error: {type(exc).__name__}"), status_code=500)


def handle_database_unavailable(request: Request, exc: Exception) -> Response[ErrorResponse]:
    """The control plane's database went away after start-up (restarted, unreachable, its pool
    exhausted): a 503 to retry, not a 500. Inference never touches the database."""
    cause = getattr(exc, "orig", None) or exc
    logger.error("database unavailable on %s %s: %s: %s", request.method, request.url.path, type(cause).__name__, cause)
    return error_response(unavailable(
        f"The control plane's database is unavailable ({type(cause).__name__}); retry shortly", retry_after=5
    ))  # fmt: skip


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: handle_api_error,
    HTTPException: handle_http_exception,
    sqlalchemy.exc.OperationalError: handle_database_unavailable,  # connection lost, server restarting
    sqlalchemy.exc.InterfaceError: handle_database_unavailable,  # connection closed under us
    sqlalchemy.exc.TimeoutError: handle_database_unavailable,  # no pooled connection in time
    Exception: handle_internal_error,
}


def encode_error_event(status: int, message: str) -> bytes:
    """The SSE event a stream sends when it fails mid-way (followed by `data: [DONE]`)."""
    body = error_body(status, message)
    return b"data: " + msgspec.json.encode(body) + b"\n\n"
