"""The HTTP app: `create_app(settings)` builds the gateway (`gateway.services`) and serves its routes.

Lifespan order: start the gateway's parts (see `gateway.runtime`), start the background loops,
serve; on shutdown cancel the loops, then drain and close the catalog.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from litestar import Litestar
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.api import admin, device, journal, ops, outbox, provision, status_page, sync
from gateway.api.envelope import EXCEPTION_HANDLERS
from gateway.config import LoadedSettings, Settings
from gateway.envelope import read_envelope
from gateway.logs import request_id
from gateway.ops.activity import ErrorEntry
from gateway.runtime import Gateway
from gateway.services import Services

access_log = logging.getLogger("gateway.access")


def create_app(settings: Settings, gateway: Gateway | None = None, *, offline: bool = False,
               sources: LoadedSettings | None = None) -> Litestar:
    """The HTTP app. `offline`: the CLI's in-process use on a stopped server's files (no lifespan,
    admin routes trusted: whoever can open the files needs no token). `sources`: where each
    setting came from (file, env, command line), for `GET /api/admin/config`."""
    gw = gateway or Gateway(settings)
    svc = gw.services

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await gw.start()
        try:
            async with anyio.create_task_group() as tg:
                gw.run_background(tg)
                try:
                    yield
                finally:
                    gw.stop_accepting()
                    tg.cancel_scope.cancel()
        finally:
            await gw.stop()

    app = Litestar(
        route_handlers=[*device.ROUTES, *provision.ROUTES, *ops.ROUTES, admin.router, outbox.router, journal.router,
                        sync.router, *status_page.ROUTES],
        # Routes name the services they use (`registry: DeviceRegistry`, ...): one dependency per field.
        dependencies={f.name: _provide(getattr(svc, f.name)) for f in dataclasses.fields(svc)}
        | {"settings_sources": _provide(sources)},
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[] if offline else [lifespan],
        # JSON routes read through `api.body.read_json_body`; this is the framework's own net under
        # them. The upload route lifts it (None) and enforces its own limits while streaming.
        request_max_body_size=settings.limits.max_json_body_bytes,
        openapi_config=OpenAPIConfig(title="AcuSight edge gateway", version=__version__, path="/schema"),
        middleware=[_observer(svc)],
        debug=False,
        logging_config=None,  # gateway.logs configures logging once, in `serve`
    )
    app.state.gateway = gw
    app.state.services = svc  # for the guards, which take no dependencies
    app.state.offline = offline
    return app


def _provide(value: object) -> Provide:
    async def provide() -> object:
        return value

    return Provide(provide, use_cache=True)


def _observer(svc: Services) -> Callable[[ASGIApp], ASGIApp]:
    """The access middleware, reporting to `svc`'s metrics and recent errors."""
    return lambda app: _observe(app, svc)


def _observe(app: ASGIApp, svc: Services) -> ASGIApp:
    """Request id, latency histogram, one access-log line per request, and error responses kept
    for the status page (method, path without query string, status, error code and message)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:  # the enum (a str) narrows the scope type for mypy
            await app(scope, receive, send)
            return
        rid = secrets.token_hex(6)
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        error_body = b""

        async def send_wrapper(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and status >= 400 and len(error_body) < _ERROR_BODY_KEPT:
                error_body += message.get("body", b"")[:_ERROR_BODY_KEPT]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or "unmatched"
            svc.metrics.request_seconds.labels(route, str(status)).observe(elapsed)
            extra: dict[str, object] = {"status": status, "duration_ms": round(elapsed * 1000, 1)}
            if status >= 400:
                code, message = _envelope_error(error_body)
                extra["code"] = code
                client = scope.get("client")
                svc.recent_errors.add(ErrorEntry(
                    at=svc.clock(), method=scope["method"], path=scope.get("path", ""), status=status,
                    code=code, message=message, request_id=rid, client=client[0] if client else "",
                ))
            # Successes at debug: at thousands of uploads a second an info line each is a cost.
            access_log.log(
                logging.DEBUG if status < 400 else logging.INFO,
                "%s %s %d %.1fms", scope["method"], route, status, elapsed * 1000, extra=extra,
            )
            request_id.reset(token)

    return middleware


_ERROR_BODY_KEPT = 2048


def _envelope_error(body: bytes) -> tuple[str, str]:
    """(code, message) from an error envelope; empty strings when the body is not one."""
    error = read_envelope(body).error
    return error.code[:64], error.message[:200]
