"""The one response envelope, and the exception handlers that render every error in it.

    {"success": bool, "data": {...}?, "error": {"code", "message", "details": str}?, "meta": {...}?}
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from gateway.errors import GatewayError

log = logging.getLogger("gateway.api")

_HTTP_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED",
    503: "SERVICE_UNAVAILABLE",
}
_JSON = "application/json"


def ok(data: Any = None, status: int = 200, meta: dict[str, Any] | None = None) -> Response[bytes]:
    body: dict[str, Any] = {"success": True}
    if data is not None:
        body["data"] = data
    if meta is not None:
        body["meta"] = meta
    return Response(msgspec.json.encode(body), status_code=status, media_type=_JSON)


def error_body(code: str, message: str, details: str = "", data: Any = None) -> bytes:
    body: dict[str, Any] = {"success": False, "error": {"code": code, "message": message, "details": details}}
    if data is not None:
        body["data"] = data
    return msgspec.json.encode(body)


def render_gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return Response(
        error_body(exc.code, exc.message, exc.details, exc.data),
        status_code=exc.status, media_type=_JSON, headers=exc.headers(),
    )


def render_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    code = _HTTP_CODES.get(status, "INTERNAL_ERROR" if status >= 500 else f"HTTP_{status}")
    details = exc.detail if isinstance(exc.detail, str) else ""
    extra = getattr(exc, "extra", None)
    if extra and status == 400:
        details = (details + ": " if details else "") + str(extra)[:500]
    message = {404: "Not found", 405: "Method not allowed"}.get(status, details or "Request failed")
    headers = dict(exc.headers or {})
    return Response(error_body(code, message, details), status_code=status, media_type=_JSON, headers=headers)


def render_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(
        error_body("INTERNAL_ERROR", "Internal error", type(exc).__name__), status_code=500, media_type=_JSON
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    GatewayError: render_gateway_error,
    HTTPException: render_http_exception,
    Exception: render_unexpected,
}
