"""`forward.delete_after_days`: remove the local bytes of images the cloud has held for N days.

Only images whose outbox entry is `delivered` qualify, never bytes not yet delivered; while the
sync API is on (`[sync] token` set) only images of `drained` batches, since a sync job may still
want them. The catalog row stays, with `bytes_removed_at` set (`forward.bytes_lifecycle`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import anyio

from gateway.catalog import Catalog
from gateway.forward.bytes_lifecycle import delete_marked, mark_removed, removable
from gateway.ops.metrics import Metrics
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.retention")
BATCH = 500


class RetentionSweeper:
    """The background loop that frees local space after delivery."""

    def __init__(self, catalog: Catalog, store: ObjectStore, metrics: Metrics, days: float, require_drained: bool,
                 clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.keep_s = days * 86400.0
        self.require_drained = require_drained
        self.clock = clock
        # Look a few times per retention period, at most hourly, at least every second.
        self.interval_s = min(3600.0, max(1.0, self.keep_s / 4))

    async def sweep(self) -> int:
        """Remove what is due now; returns how many images lost their local bytes."""
        total = 0
        while True:
            now = self.clock()
            due = await self.catalog.read(partial(removable, delivered_before=now - self.keep_s,
                                                  drained_only=self.require_drained, limit=BATCH))
            if not due:
                return total
            # Marked before the objects go (bytes_lifecycle): a crash in between leaves an object
            # `gateway verify --repair` removes, never a row whose bytes are unexpectedly gone.
            await self.catalog.write(partial(mark_removed, image_ids=[d.image_id for d in due], now=now))
            await anyio.to_thread.run_sync(delete_marked, self.store, self.metrics, due, "retention")
            total += len(due)
            if len(due) < BATCH:
                return total

    async def run(self) -> None:
        while True:
            try:
                removed = await self.sweep()
                if removed:
                    log.info("removed local bytes of %d delivered image(s)", removed)
            except Exception:
                log.exception("retention sweep failed")
            await anyio.sleep(self.interval_s)
