"""Reading request bodies: every route that reads one goes through here, so each has a size limit
and a read timeout (a silent or trickling client gets 408, an oversized body 413 while it streams).

The upload route streams its multipart body through `RequestBody`; every JSON route reads its
whole (small) body with `read_json_body`, in one line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from litestar import Request
from litestar.types import Receive

from gateway.config import Settings
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout, ValidationFailed


class ClientGone(ValidationFailed):
    default_message = "Client disconnected before the body was complete"


class RequestBody:
    """The request body as it arrives. A client silent for `read_timeout` seconds is cut off, and
    so is one that trickles: the body must arrive within `read_timeout` plus one second per
    `min_rate` bytes received (as Apache's mod_reqtimeout does), else a byte a second lasts forever."""

    def __init__(self, receive: Receive, read_timeout: float, min_rate: int = 0) -> None:
        self.receive = receive
        self.read_timeout = read_timeout
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.received = 0
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            wait = self.read_timeout
            if self.min_rate:
                wait = min(wait, self.started + self.read_timeout + self.received / self.min_rate - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                # asyncio.timeout rather than anyio.fail_after: this runs once per body chunk, and
                # anyio's scope cost a tenth of the event loop's time in a 1 MiB upload (py-spy).
                async with asyncio.timeout(wait):
                    message = await self.receive()
            except TimeoutError:
                raise RequestTimeout(
                    details=f"body slower than {self.min_rate} bytes/s or silent for {self.read_timeout:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            self.done = not message.get("more_body", False)
            chunk = cast(bytes, message.get("body", b""))
            if chunk:
                self.received += len(chunk)
                yield chunk

    async def drain(self, limit: int) -> None:
        """Read and drop the rest of the body (at most `limit` bytes in all), so that a client that
        sends its whole body before reading gets the answer instead of a stalled connection."""
        try:
            async for _ in self.chunks():
                if self.received > limit:
                    return
        except GatewayError:
            return


async def read_json_body(request: Request[Any, Any, Any], settings: Settings) -> bytes:
    """The whole body of a JSON route, at most `limits.max_json_body_bytes` (413 PAYLOAD_TOO_LARGE,
    refused from Content-Length or at the first byte past the limit, chunked or not), each piece
    within the uploads' read timeout (408). On either refusal the connection is closed."""
    limit = settings.limits.max_json_body_bytes
    declared = request.headers.get("content-length")
    try:
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge("Request body is too large", f"limit is {limit} bytes")
        body = RequestBody(request.receive, settings.server.read_timeout_s, settings.server.min_body_rate_bytes_per_s)
        pieces: list[bytes] = []
        async for chunk in body.chunks():
            if body.received > limit:
                raise PayloadTooLarge("Request body is too large", f"limit is {limit} bytes")
            pieces.append(chunk)
    except (PayloadTooLarge, RequestTimeout, ClientGone) as exc:
        exc.close_connection = True  # the rest of the body is never read
        raise
    return b"".join(pieces)
