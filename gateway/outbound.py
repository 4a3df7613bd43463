"""The gateway's one outbound HTTP client: a shared `aiohttp.ClientSession` on the event loop.

Every request the server sends (the cloud's uploads, probes, key checks and check-ins; the S3
store's PUTs and GETs of images) goes through `Outbound.session`, so pooling, timeouts, framing
and TLS are the same everywhere. The runtime owns it: started in the lifespan, closed at stop.

Proxies are chosen per request by the caller (`proxy_for`): the cloud's requests go through
`[cloud] proxy` or the environment's HTTP(S)_PROXY/NO_PROXY; the local S3 store is reached
directly. So the session does not read the environment itself (`trust_env` off).
"""

from __future__ import annotations

import asyncio
import urllib.request
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.connector import Connection

USER_AGENT = "acusight-edge-gateway"


class CleanConnector(aiohttp.TCPConnector):
    """A connector that never hands out a kept-alive connection holding bytes nobody asked for.

    aiohttp pools a connection once its answer is read; if the peer then sends more (an extra,
    unsolicited response), the next request on it would take those bytes for its own answer. Such
    a connection is closed here when taken from the pool, and a fresh one used instead.

    `on_new` is called for each connection handed out for the first time (tests count them)."""

    def __init__(self, on_new: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_new = on_new
        self.seen: weakref.WeakSet[Any] = weakref.WeakSet()  # the protocols (connections) handed out

    async def connect(self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
                      ) -> Connection:
        while True:
            conn = await super().connect(req, traces, timeout)
            proto = conn.protocol
            if proto is None or not proto.should_close:
                if proto is not None and proto not in self.seen:
                    self.seen.add(proto)
                    self.on_new()
                return conn
            conn.close()  # leftover bytes, a parse error or an unread payload: not reusable


class Outbound:
    """Owns the shared session; `start` and `aclose` run in the event loop that uses it."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections_opened = 0  # tests check reuse with it

    async def start(self) -> None:
        """Open the session in the running loop (again, after `aclose` or in another loop)."""
        loop = asyncio.get_running_loop()
        if self._session is not None and self._loop is loop and not self._session.closed:
            return
        # No trace hooks: with any, aiohttp awaits a signal per body chunk and request step.
        connector = CleanConnector(self._opened, limit=self.limit, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector, trust_env=False, auto_decompress=False,
            headers={"User-Agent": USER_AGENT}, timeout=aiohttp.ClientTimeout(total=None),
        )
        self._loop = loop

    def _opened(self) -> None:
        self.connections_opened += 1

    async def session(self) -> aiohttp.ClientSession:
        """The session, opened on first use in this loop (tests that use a store without a runtime)."""
        if self._session is None or self._loop is not asyncio.get_running_loop() or self._session.closed:
            await self.start()
        assert self._session is not None
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()


def env_proxy(url: str) -> str | None:
    """The proxy HTTP_PROXY / HTTPS_PROXY name for `url`, unless NO_PROXY exempts its host."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def cloud_proxy(url: str, configured: str) -> str | None:
    """The cloud's proxy: `[cloud] proxy` when set ("direct": none), else the environment's."""
    if configured == "direct":
        return None
    return configured or env_proxy(url)
