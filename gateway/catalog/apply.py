"""Journal records into DuckDB: the SQL of the current schema for each record kind.

The journal holds typed records only; this module is the one place that knows which rows and
updates each kind means, so a schema migration changes these appliers and an older journal is
still applied correctly. A group of frames costs a few statements: rows are inserted table by
table (one INSERT per chunk of rows), deliveries and seals are batched updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb

from gateway.catalog.records import BatchOpened, BatchSealed, Frame, ImageAccepted, ImageWithdrawn, OutboxDelivered

Conn = duckdb.DuckDBPyConnection
_CHUNK = 128  # rows per INSERT or batched UPDATE statement

BATCH_COLUMNS = ("batch_id", "device_id", "state", "opened_at")
IMAGE_COLUMNS = ("image_id", "seq", "batch_id", "device_id", "filename", "content_type", "size", "xxh3_128",
                 "storage_key", "metadata", "received_at", "fingerprint", "near_duplicate_of")
OUTBOX_COLUMNS = ("image_id", "seq", "device_id", "size", "state", "created_at", "next_attempt_at", "priority_class")

# collecting -> sealed, with the batch's final counts; a replay finds it sealed and changes nothing.
_SEALED = ("UPDATE batches SET state = 'sealed', sealed_at = v.sealed_at, image_count = v.n, "
            "total_bytes = v.total FROM (VALUES {rows}) v(id, sealed_at, n, total) "
            "WHERE batches.batch_id = v.id AND batches.state = 'collecting'")
_SEAL_ROW = "(?, ?::DOUBLE, ?::INTEGER, ?::BIGINT)"
# pending -> delivered, and the cloud's ids on the image (index look-ups by image id).
_DELIVERED = ("UPDATE outbox SET state = 'delivered', delivered_at = v.done_at, last_status = v.status, "
              "attempts = outbox.attempts + 1 FROM (VALUES {rows}) v(id, done_at, status) "
              "WHERE outbox.image_id = v.id AND outbox.state = 'pending'")
_DELIVERED_ROW = "(?, ?::DOUBLE, ?::INTEGER)"
_CLOUD_IDS = ("UPDATE images SET cloud_image_id = coalesce(v.image_key, images.cloud_image_id), "
              "cloud_batch_id = coalesce(v.batch_key, images.cloud_batch_id), "
              "cloud_storage_key = coalesce(v.storage_key, images.cloud_storage_key) "
              "FROM (VALUES {rows}) v(id, image_key, batch_key, storage_key) WHERE images.image_id = v.id")
_CLOUD_IDS_ROW = "(?, ?::VARCHAR, ?::VARCHAR, ?::VARCHAR)"
# A withdrawn upload's rows go; its batch goes too if left collecting and empty, and a batch sealed
# with it (possible only after a crash) gets its counts again and a new manifest. All idempotent.
_WITHDRAWN = (
    "DELETE FROM outbox WHERE image_id IN (SELECT unnest(?::VARCHAR[]))",
    "DELETE FROM images WHERE image_id IN (SELECT unnest(?::VARCHAR[]))",
)
_WITHDRAWN_BATCHES = (
    "DELETE FROM batches WHERE batch_id IN (SELECT unnest(?::VARCHAR[])) AND state = 'collecting' "
    "AND NOT EXISTS (SELECT 1 FROM images i WHERE i.batch_id = batches.batch_id)",
    "UPDATE batches SET image_count = (SELECT count(*) FROM images i WHERE i.batch_id = batches.batch_id), "
    "total_bytes = (SELECT coalesce(sum(size), 0) FROM images i WHERE i.batch_id = batches.batch_id), "
    "manifest_key = NULL WHERE batch_id IN (SELECT unnest(?::VARCHAR[])) AND state <> 'collecting'",
)


def apply_frames(conn: Conn, frames: Sequence[Frame], replay: bool) -> None:
    """Every record of `frames` into DuckDB (inside the caller's transaction): batches opened,
    images with their outbox entries, deliveries, seals, then withdrawals. `replay` skips rows
    already there (a frame applied before a crash); the updates and deletes are idempotent."""
    opened: list[tuple[Any, ...]] = []
    images: list[tuple[Any, ...]] = []
    outbox: list[tuple[Any, ...]] = []
    delivered: list[list[Any]] = []
    cloud_ids: list[list[Any]] = []
    sealed: list[list[Any]] = []
    withdrawn: list[str] = []
    withdrawn_batches: set[str] = set()
    for frame in frames:
        for r in frame.records:
            if isinstance(r, ImageAccepted):
                images.append((r.image_id, r.seq, r.batch_id, r.device_id, r.filename, r.content_type, r.size,
                               r.xxh3_128, r.storage_key, r.metadata, r.received_at, r.fingerprint,
                               r.near_duplicate_of))
                outbox.append((r.image_id, r.seq, r.device_id, r.size, r.outbox_state, r.received_at,
                               r.received_at, r.priority_class))
            elif isinstance(r, OutboxDelivered):
                delivered.append([r.image_id, r.at, r.status])
                if r.cloud_image_id or r.cloud_batch_id or r.cloud_storage_key:
                    cloud_ids.append([r.image_id, r.cloud_image_id, r.cloud_batch_id, r.cloud_storage_key])
            elif isinstance(r, BatchOpened):
                opened.append((r.batch_id, r.device_id, "collecting", r.opened_at))
            elif isinstance(r, BatchSealed):
                sealed.append([r.batch_id, r.sealed_at, r.image_count, r.total_bytes])
            elif isinstance(r, ImageWithdrawn):
                withdrawn.append(r.image_id)
                withdrawn_batches.add(r.batch_id)
    insert_rows(conn, "batches", BATCH_COLUMNS, opened, or_ignore=replay)
    insert_rows(conn, "images", IMAGE_COLUMNS, images, or_ignore=replay)
    insert_rows(conn, "outbox", OUTBOX_COLUMNS, outbox, or_ignore=replay)
    update_rows(conn, _DELIVERED, _DELIVERED_ROW, delivered)
    update_rows(conn, _CLOUD_IDS, _CLOUD_IDS_ROW, cloud_ids)
    update_rows(conn, _SEALED, _SEAL_ROW, sealed)
    if withdrawn:
        for sql in _WITHDRAWN:
            conn.execute(sql, [withdrawn])
        for sql in _WITHDRAWN_BATCHES:
            conn.execute(sql, [sorted(withdrawn_batches)])


def insert_rows(conn: Conn, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]],
                or_ignore: bool = False) -> None:
    """INSERT many rows as `VALUES (?, ...), (?, ...)`: cheaper in DuckDB than `SELECT unnest(?)`
    over lists, and far cheaper than a statement per row (docs/design.md). `or_ignore` skips rows
    whose key is already there (journal replay)."""
    one = "(" + ", ".join("?" * len(columns)) + ")"
    head = f"INSERT {'OR IGNORE ' if or_ignore else ''}INTO {table} ({', '.join(columns)}) VALUES "
    for start in range(0, len(rows), _CHUNK):
        part = rows[start : start + _CHUNK]
        conn.execute(head + ", ".join([one] * len(part)), [v for row in part for v in row])


def update_rows(conn: Conn, sql: str, row: str, params: list[list[Any]]) -> None:
    """A batched UPDATE ... FROM (VALUES {rows}): one statement per chunk of rows."""
    for start in range(0, len(params), _CHUNK):
        part = params[start : start + _CHUNK]
        conn.execute(sql.format(rows=", ".join([row] * len(part))), [v for p in part for v in p])
