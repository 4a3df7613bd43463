"""Room for new uploads: refuse with 507 before anything undelivered is at risk.

Two limits: `limits.max_pending_bytes` (bytes not yet delivered to the cloud) and
`limits.min_free_disk_bytes` (free space kept on the data folder's disk, which holds the spool,
the catalog and, with folder storage, the objects). The backlog figure comes from the catalog at
most once a second, plus what was accepted since.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from gateway.catalog import Catalog
from gateway.errors import InsufficientStorage
from gateway.metrics import Metrics

REFRESH_S = 1.0


class CapacityGuard:
    def __init__(self, catalog: Catalog, data_dir: Path, max_pending_bytes: int, min_free_disk_bytes: int,
                 metrics: Metrics) -> None:
        self.catalog = catalog
        self.data_dir = data_dir
        self.max_pending_bytes = max_pending_bytes
        self.min_free_disk_bytes = min_free_disk_bytes
        self.metrics = metrics
        self._pending = 0
        self._refreshed = 0.0

    async def check(self, incoming: int) -> None:
        """Raise `InsufficientStorage` if an upload of about `incoming` bytes would break a limit."""
        if self.min_free_disk_bytes:
            try:
                free = shutil.disk_usage(self.data_dir).free
            except OSError:
                free = None
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
