"""`gateway serve`: the admin token file, one start-up summary line, and start-up failures as one line.

A second server on a locked catalog, a key secret that does not fit: each ends the process with
status 2 and one line saying what to do, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from gateway import __version__
from gateway.catalog import CatalogLocked
from gateway.config import LoadedSettings, Settings
from gateway.config.admintoken import AdminTokenError, ensure_admin_token
from gateway.errors import StartRefused

log = logging.getLogger("gateway")
E = TypeVar("E", bound=BaseException)


def startup_line(settings: Settings, admin_from: str) -> str:
    """Everything an admin checks first, in one line: version, address, storage, data, forwarding, APIs."""
    s = settings
    scheme = "https" if s.server.certfile and s.server.keyfile else "http"
    storage = (f"folder {s.data_dir / 'objects'}" if s.storage.backend == "folder"
               else f"minio {s.minio.endpoint} bucket {s.minio.bucket}")
    forwarding = f"on to {s.cloud.url}" if s.cloud.url else "off (cloud.url empty)"
    admin = f"on ({admin_from})" if s.admin.token else "off"
    sync = "on" if s.sync.token else "off"
    return (f"gateway {__version__} listening on {scheme}://{s.server.listen}; storage {storage}; data {s.data_dir}; "
            f"forwarding {forwarding}; admin API {admin}; sync API {sync}")


def announce(app: Callable[..., object], line: Callable[[], str]) -> Callable[..., object]:
    """The ASGI app, logging `line()` once its start-up (the gateway's lifespan) has completed."""

    async def wrapped(scope: dict[str, object], receive: Callable[..., object], send: Callable[..., object]) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)  # type: ignore[misc]
            return

        async def send_and_tell(message: dict[str, object]) -> None:
            if message.get("type") == "lifespan.startup.complete":
                log.info("%s", line())
            await send(message)  # type: ignore[misc]

        await app(scope, receive, send_and_tell)  # type: ignore[misc]

    return wrapped


def serve(loaded: LoadedSettings) -> int:
    settings = loaded.settings
    # A stop signal that arrives while we are still starting must not kill the process: note it,
    # and stop cleanly as soon as the server is up.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))

    import hypercorn.asyncio
    from hypercorn.config import Config as HypercornConfig

    from gateway import logs
    from gateway.api.connections import protect
    from gateway.app import create_app
    from gateway.system import eventloop, malloc

    # Everything the server creates (data folder, catalog, objects, manifests, spool) is for its own
    # user only: folders 0700, files 0600.
    os.umask(0o077)
    malloc.tune_for_images()
    logs.configure(settings.log.level, settings.log.format)
    try:
        admin_from = ensure_admin_token(settings)
    except (AdminTokenError, OSError) as exc:
        print(f"gateway: cannot serve: {exc}", file=sys.stderr)
        return 1
    if admin_from.startswith("new token"):
        log.info("admin token: %s (the CLI on this host reads it there)", admin_from)
    if admin_from != "setting admin.token" and settings.admin.token:
        loaded.sources["admin.token"] = f"admin.token_file {settings.admin.token_file}"
    app = create_app(settings, sources=loaded)
    config = HypercornConfig()
    config.bind = [settings.server.listen]
    config.graceful_timeout = settings.server.graceful_timeout_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # hypercorn's idle timer runs from the connection's start (or its previous answer) until a
    # request's headers are complete: it is both the header timeout and the keep-alive timeout.
    config.keep_alive_timeout = settings.server.header_timeout_s
    if settings.server.certfile and settings.server.keyfile:
        config.certfile = settings.server.certfile
        config.keyfile = settings.server.keyfile

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            app.state.gateway.stop_accepting()  # readiness turns 503 at once
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if early:
            on_signal()
        served = announce(protect(app, settings.server), lambda: startup_line(settings, admin_from))
        await hypercorn.asyncio.serve(served, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    # A failed start is logged by the server's lifespan with its whole traceback; the one line below
    # says it all, so those records are dropped while starting.
    quiet = _StartupFailureFilter()
    for name in ("hypercorn.error", "litestar", "gateway"):
        logging.getLogger(name).addFilter(quiet)
    try:
        eventloop.run(main)
    except Exception as exc:  # start-up failures: one clear line, non-zero exit
        locked = _find(exc, CatalogLocked)
        if locked is not None:
            pid = re.search(r"PID (\d+)", str(locked))
            who = f"PID {pid.group(1)}" if pid else "another process"
            print(f"gateway: refusing to start: another gateway ({who}) already serves the catalog "
                  f"{settings.data_dir / 'catalog.duckdb'}; stop it first, or give this one its own data.dir",
                  file=sys.stderr)
            return 2
        refused = _find(exc, StartRefused)
        if refused is not None:  # data would be lost or misread: status 2, the operator must act
            print(f"gateway: refusing to start: {refused}", file=sys.stderr)
            return 2
        print(f"gateway: cannot serve: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a repeated stop signal while exiting changes nothing
            signal.signal(sig, signal.SIG_IGN)
    return 0


class _StartupFailureFilter(logging.Filter):
    """Drops the tracebacks of a start-up refused for a known reason (printed as one line instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or (_find(exc, CatalogLocked) is None and _find(exc, StartRefused) is None)


def _find(exc: BaseException, kind: type[E]) -> E | None:
    """The `kind` exception behind a start-up failure, however the server wrapped it."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, kind):
            return cur
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return None
