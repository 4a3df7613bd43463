"""`StoreProbe`: whether the object store answers, asked at most once a second.

Uploads and readiness fail fast with 503 while the store is down, without each of them waiting
on its own probe: concurrent callers share one answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import anyio

from gateway.errors import GatewayError
from gateway.storage.base import ObjectStore

FRESH_S = 1.0  # an answer this recent stands


class StoreProbe:
    """`require()` raises the store's error while it is known to be down (re-checked each second)."""

    def __init__(self, store: ObjectStore, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.monotonic = monotonic
        self._ok_at = 0.0
        self._lock = asyncio.Lock()

    async def require(self) -> None:
        if self.monotonic() - self._ok_at < FRESH_S:
            return
        async with self._lock:  # one probe at a time: concurrent uploads share its answer
            if self.monotonic() - self._ok_at < FRESH_S:
                return
            try:
                await anyio.to_thread.run_sync(self.store.ensure_ready)
            except GatewayError:
                self._ok_at = 0.0
                raise
            self._ok_at = self.monotonic()
