"""The local bytes of an image, from upload to removal: every transition in one place.

    stored     an upload is acknowledged: the object is in the store, its row committed
    cached     while its outbox entry is pending, a copy may sit in the forward cache (forward.cache)
    delivered  the cloud holds it (outbox state `delivered`; forward.outbox)
    removed    `images.bytes_removed_at` is set, then the object is deleted: after
               `forward.delete_after_days` (forward.retention), under disk pressure
               (ingest.capacity), or by `gateway verify --repair` for an object already gone

Only delivered bytes are ever removed, and the row is always marked before the object goes: a
crash in between leaves an object `verify --repair` deletes, never a row whose bytes are missing.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from gateway.catalog import Conn
from gateway.ops.metrics import Metrics
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.forward.bytes")


class LocalBytes(NamedTuple):
    """An image's bytes held in the store."""

    image_id: str
    storage_key: str
    size: int


def removable(conn: Conn, *, drained_only: bool, limit: int, delivered_before: float | None = None) -> list[LocalBytes]:
    """Delivered images still holding local bytes, oldest delivery first; `drained_only`: of drained
    batches only (a sync job may still want the others); `delivered_before`: delivered by then."""
    sql = ("SELECT i.image_id, i.storage_key, i.size FROM images i JOIN outbox o ON o.image_id = i.image_id "
           "WHERE o.state = 'delivered' AND i.bytes_removed_at IS NULL")
    params: list[object] = []
    if delivered_before is not None:
        sql += " AND o.delivered_at <= ?"
        params.append(delivered_before)
    if drained_only:
        sql += " AND i.batch_id IN (SELECT batch_id FROM batches WHERE state = 'drained')"
    rows = conn.execute(sql + " ORDER BY o.delivered_at, o.seq LIMIT ?", [*params, limit]).fetchall()
    return [LocalBytes(r[0], r[1], int(r[2])) for r in rows]


def mark_removed(conn: Conn, image_ids: list[str], now: float) -> None:
    """delivered -> removed: the one write of `bytes_removed_at` (idempotent)."""
    conn.execute(
        "UPDATE images SET bytes_removed_at = ? WHERE image_id IN (SELECT unnest(?::VARCHAR[])) "
        "AND bytes_removed_at IS NULL", [now, image_ids],
    )


def delete_marked(store: ObjectStore, metrics: Metrics, due: list[LocalBytes], why: str,
                  under_pressure: bool = False) -> int:
    """Delete the objects of rows `mark_removed` has marked (blocking: run in a worker thread);
    returns how many went. One that will not go is left for `verify --repair`."""
    done = 0
    for item in due:
        try:
            store.delete(item.storage_key)
        except Exception as exc:  # marked already: `verify --repair` removes the leftover
            log.warning("%s could not remove %s: %s", why, item.storage_key, exc)
            continue
        metrics.evictions.inc(item.size)
        if under_pressure:
            metrics.pressure_evictions.inc()
        done += 1
    return done
