"""`forward.delete_after_days`: remove the local bytes of images the cloud has held for N days.

Only images whose outbox entry is `delivered` qualify, never bytes not yet delivered; while the
sync API is on (`[sync] token` set) only images of `drained` batches, since a sync job may still
want them. The catalog row stays, with `bytes_removed_at` set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import anyio

from gateway.catalog import Catalog, Conn
from gateway.ops.metrics import Metrics
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.retention")
BATCH = 500


def removable(conn: Conn, older_than: float, require_drained: bool, limit: int) -> list[tuple[str, str, int]]:
    """(image id, storage key, size) of delivered images whose bytes may go."""
    sql = (
        "SELECT i.image_id, i.storage_key, i.size FROM images i JOIN outbox o ON o.image_id = i.image_id "
        "WHERE o.state = 'delivered' AND o.delivered_at <= ? AND i.bytes_removed_at IS NULL"
    )
    if require_drained:
        sql += " AND i.batch_id IN (SELECT batch_id FROM batches WHERE state = 'drained')"
    rows = conn.execute(sql + " ORDER BY o.delivered_at LIMIT ?", [older_than, limit]).fetchall()
    return [(r[0], r[1], int(r[2])) for r in rows]


def mark_removed(conn: Conn, image_ids: list[str], now: float) -> None:
    conn.execute(
        "UPDATE images SET bytes_removed_at = ? WHERE image_id IN (SELECT unnest(?::VARCHAR[])) "
        "AND bytes_removed_at IS NULL", [now, image_ids]
    )


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
            due = await self.catalog.read(
                partial(removable, older_than=now - self.keep_s, require_drained=self.require_drained, limit=BATCH))
            if not due:
                return total
            # Marked before the objects go (as capacity.py evicts): a crash in between leaves an
            # object `gateway verify --repair` removes, never a row whose bytes are unexpectedly gone.
            await self.catalog.write(partial(mark_removed, image_ids=[d[0] for d in due], now=now))
            await anyio.to_thread.run_sync(self._delete, due)
            total += len(due)
            if len(due) < BATCH:
                return total

    def _delete(self, due: list[tuple[str, str, int]]) -> None:
        for _, key, size in due:
            try:
                self.store.delete(key)
            except Exception as exc:  # left for `verify --repair`
                log.warning("could not remove delivered bytes %s: %s", key, exc)
                continue
            self.metrics.evictions.inc(size)

    async def run(self) -> None:
        while True:
            try:
                removed = await self.sweep()
                if removed:
                    log.info("removed local bytes of %d delivered image(s)", removed)
            except Exception:
                log.exception("retention sweep failed")
            await anyio.sleep(self.interval_s)
