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
from gateway.logs import request_id

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


def server_side_details(status: int, code: str, message: str, details: str) -> str:
    """What a client sees as `details` of a server-side failure (5xx, 507 included): a pointer to
    the log line holding the full text, never paths, errno text or storage errors."""
    rid = request_id.get()
    log.warning("%d %s: %s%s", status, code, message, f" ({details})" if details else "",
                extra={"status": status, "code": code})
    return f"server-side failure; the gateway log has the details under request id {rid or '-'}"


def render_gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    details = exc.details
    if exc.status >= 500:
        details = server_side_details(exc.status, exc.code, exc.message, exc.details)
    return Response(
        error_body(exc.code, exc.message, details, exc.data),
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
    if status >= 500:
        message = "Internal error" if status == 500 else "Request failed"
        details = server_side_details(status, code, message, details)
    headers = dict(exc.headers or {})
    return Response(error_body(code, message, details), status_code=status, media_type=_JSON, headers=headers)


def render_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    details = f"server-side failure; the gateway log has the details under request id {request_id.get() or '-'}"
    return Response(error_body("INTERNAL_ERROR", "Internal error", details), status_code=500, media_type=_JSON)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    GatewayError: render_gateway_error,
    HTTPException: render_http_exception,
    Exception: render_unexpected,
}
