"""Room for new uploads: refuse with 507 before anything undelivered is at risk.

Two limits: `limits.max_pending_bytes` (bytes not yet delivered to the cloud) and
`limits.min_free_disk_bytes` (free space kept on the data folder's disk, which holds the spool,
the catalog, the forward cache and, with folder storage, the objects). The backlog figure comes from the catalog at
most once a second, plus what was accepted since.

Below the disk floor the forward cache is emptied first (copies only: the store keeps those bytes).
Then, when the objects live on that disk (folder storage), the local bytes of
images already delivered to the cloud are evicted first, oldest delivery first (images of drained
batches before the others while the sync API is on), never an undelivered one; only when nothing
delivered is left does the upload get its 507. Each eviction is a delivered -> removed transition
of `forward.bytes_lifecycle` (the row marked before the object goes). Counted in /metrics:
evicted bytes and images, refusals by reason.
"""

from __future__ import annotations

import logging
import shutil
import time
from functools import partial
from pathlib import Path

import anyio

from gateway.catalog import Catalog
from gateway.errors import InsufficientStorage
from gateway.forward.bytes_lifecycle import LocalBytes, delete_marked, mark_removed, removable
from gateway.forward.cache import ForwardCache
from gateway.ops.metrics import Metrics
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.ingest.capacity")
REFRESH_S = 1.0
EVICT_BATCH = 100
EVICT_MAX_PER_CALL = 5000  # bounds the latency one upload can spend making room


class CapacityGuard:
    def __init__(self, catalog: Catalog, data_dir: Path, max_pending_bytes: int, min_free_disk_bytes: int,
                 metrics: Metrics, store: ObjectStore | None = None, prefer_drained: bool = False,
                 forward_cache: ForwardCache | None = None) -> None:
        self.catalog = catalog
        self.data_dir = data_dir
        self.max_pending_bytes = max_pending_bytes
        self.min_free_disk_bytes = min_free_disk_bytes
        self.metrics = metrics
        # Evicting frees this disk only when the objects live on it (folder storage).
        self.store = store if store is not None and store.name == "folder" else None
        self.prefer_drained = prefer_drained
        self.forward_cache = forward_cache  # emptied before any upload is refused
        self._pending = 0
        self._refreshed = 0.0
        self._evicting = anyio.Lock()

    def _free(self) -> int | None:
        try:
            return shutil.disk_usage(self.data_dir).free
        except OSError:
            return None

    async def check(self, incoming: int) -> None:
        """Raise `InsufficientStorage` if an upload of about `incoming` bytes would break a limit."""
        if self.min_free_disk_bytes:
            free = self._free()
            cache = self.forward_cache
            if free is not None and free - incoming < self.min_free_disk_bytes and cache is not None and cache.size:
                freed = await anyio.to_thread.run_sync(cache.clear)
                log.warning("disk nearly full: dropped %d bytes of the forward cache", freed)
                free = self._free()
            if free is not None and free - incoming < self.min_free_disk_bytes and self.store is not None:
                free = await self.make_room(incoming)
            if free is not None and free - incoming < self.min_free_disk_bytes:
                self.metrics.storage_refusals.labels("disk_floor").inc()
                raise InsufficientStorage(
                    "Local disk is nearly full", f"{free} bytes free, {self.min_free_disk_bytes} kept in reserve"
                )
        if self.max_pending_bytes:
            if time.monotonic() - self._refreshed > REFRESH_S:
                row = await self.catalog.read(lambda c: c.execute(
                    "SELECT coalesce(sum(size), 0) FROM outbox WHERE state IN ('pending', 'held')").fetchone())
                self._pending = int(row[0]) if row else 0
                self._refreshed = time.monotonic()
            if self._pending + incoming > self.max_pending_bytes:
                self.metrics.storage_refusals.labels("pending_bytes").inc()
                raise InsufficientStorage(
                    "Too many bytes waiting for the cloud",
                    f"{self._pending} bytes pending, limit {self.max_pending_bytes}",
                )

    def accepted(self, size: int) -> None:
        self._pending += size

    async def make_room(self, incoming: int) -> int | None:
        """Evict delivered bytes until the floor plus some headroom is free (or nothing delivered
        is left); returns the free bytes then. One eviction at a time; waiters re-check first."""
        headroom = max(incoming, self.min_free_disk_bytes // 8)
        async with self._evicting:
            evicted = 0
            for drained_only in (True, False) if self.prefer_drained else (False,):
                while evicted < EVICT_MAX_PER_CALL:
                    free = self._free()
                    if free is None or free - incoming >= self.min_free_disk_bytes + headroom:
                        return free
                    due = await self.catalog.read(partial(removable, drained_only=drained_only, limit=EVICT_BATCH))
                    if not due:
                        break
                    removed = await self._evict(due)
                    if not removed:  # the store refuses deletes: stop marking rows
                        return self._free()
                    evicted += removed
            if evicted:
                log.warning("disk nearly full: evicted the local bytes of %d delivered image(s)", evicted)
            return self._free()

    async def _evict(self, due: list[LocalBytes]) -> int:
        assert self.store is not None
        now = time.time()
        ids = [item.image_id for item in due]
        await self.catalog.write(lambda c: mark_removed(c, ids, now))
        return await anyio.to_thread.run_sync(delete_marked, self.store, self.metrics, due, "eviction", True)
