"""Connection-level defences around the app, at the ASGI layer (hypercorn 0.18 offers no public
connection cap and no hook after a response): a cap on requests in progress, and lingering close.

- `cap_requests`: past `server.max_connections` requests in progress, one more is answered at
  once with 503 SERVICE_UNAVAILABLE, Retry-After and `Connection: close`, its body unread. (The
  connections hypercorn holds before a request starts, sending headers or idle between requests,
  are bounded in time by `server.header_timeout_s`, hypercorn's `keep_alive_timeout`.)
- `linger_on_close`: an answer that says `Connection: close` while the request body was not read
  to its end (a refused upload, a body over its limit) would, closed at once, make the kernel
  reset the connection under a client still writing its body, which then never sees the answer.
  So the answer's last (empty) piece is held back while what the client still sends is read and
  dropped, up to `server.linger_s` seconds and `server.linger_bytes` bytes (as nginx's lingering
  close), then the response ends and hypercorn closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from gateway.api.envelope import error_body
from gateway.config import ServerSettings
from gateway.errors import ServiceUnavailable

log = logging.getLogger("gateway.http")

UNCAPPED_PATHS = frozenset({"/api/health", "/metrics"})  # cheap, bodiless, and how overload is seen
CAP_RETRY_AFTER_S = 1
_WARN_EVERY_S = 10.0


def protect(app: ASGIApp, server: ServerSettings) -> ASGIApp:
    """The app as hypercorn serves it: requests capped, refusals lingering before the close."""
    return linger_on_close(cap_requests(app, server.max_connections), server.linger_s, server.linger_bytes)


def cap_requests(app: ASGIApp, limit: int) -> ASGIApp:
    """At most `limit` HTTP requests in the app at once; the next gets 503 at once."""
    in_progress = 0
    warned_at = 0.0
    refused = 0

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal in_progress, warned_at, refused
        if scope["type"] != ScopeType.HTTP or scope["path"] in UNCAPPED_PATHS:
            await app(scope, receive, send)
            return
        if in_progress >= limit:
            refused += 1
            if time.monotonic() - warned_at > _WARN_EVERY_S:
                warned_at = time.monotonic()
                log.warning("%d request(s) in progress, the server.max_connections cap: %d refused so far",
                            in_progress, refused)
            await _refuse(send, limit)
            return
        in_progress += 1
        try:
            await app(scope, receive, send)
        finally:
            in_progress -= 1

    return middleware


async def _refuse(send: Send, limit: int) -> None:
    body = error_body(ServiceUnavailable.code, "Too many requests in progress",
                      f"the gateway handles {limit} requests at once (server.max_connections); retry shortly")
    await send({"type": "http.response.start", "status": ServiceUnavailable.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(CAP_RETRY_AFTER_S).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def linger_on_close(app: ASGIApp, seconds: float, max_bytes: int) -> ASGIApp:
    """Hold back the end of a `Connection: close` answer sent before the body was read, while the
    rest of the body is discarded (bounded by `seconds` and `max_bytes`)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or seconds <= 0:
            await app(scope, receive, send)
            return
        body_done = False
        lingering = False  # this answer's end is held back
        held = False  # ... and has been reached

        async def receive_wrapper() -> ReceiveMessage:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal lingering, held
            if message["type"] == "http.response.start":
                lingering = not body_done and _should_linger(message)
            elif message["type"] == "http.response.body" and lingering and not message.get("more_body", False):
                held = True
                message = {"type": "http.response.body", "body": message.get("body", b""), "more_body": True}
            await send(message)

        await app(scope, receive_wrapper, send_wrapper)
        if held:
            await _discard(receive, seconds, max_bytes)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return middleware


def _should_linger(start: Message) -> bool:
    """An answer that closes the connection, with a known length (the client knows when it has it
    all while the response is still open), and not for a stalled body (408: nothing comes)."""
    headers = {bytes(k).lower(): bytes(v) for k, v in start.get("headers", ())}  # type: ignore[attr-defined]
    return (headers.get(b"connection", b"").lower() == b"close" and b"content-length" in headers
            and start.get("status") != 408)


async def _discard(receive: Receive, seconds: float, max_bytes: int) -> None:
    """Read and drop request body pieces until the body ends, the client leaves, `seconds` pass
    or more than `max_bytes` arrived."""
    got = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while got <= max_bytes:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                got += len(message.get("body", b""))
