"""The outbox: one entry per accepted image, written in the same transaction as the image row.

    pending --(2xx or 409 from the cloud)----------------------------> delivered
    pending --(408/429/5xx/transport error: attempts += 1, backoff)--> pending
    pending --(other 4xx, or forward.max_attempts reached)-----------> dead
    pending --(401/403: the device's key refused)--------------------> dead, with the device's other pending
    held    --(the cloud confirms a quarantined device's key)--------> pending
    held    --(the cloud refuses the key)----------------------------> dead
    dead    --(`gateway outbox retry`)-------------------------------> pending
    dead    --(`gateway outbox retry`, device still in quarantine)----> held
    skipped --(`gateway outbox retry`: a held near-duplicate released)-> pending

A `skipped` entry is a near-duplicate frame kept at the edge (`dedup.near_duplicates = "hold"`):
never sent unless released, and settled as far as its batch is concerned.

Entries are sent oldest first (`seq`) within each device. Nothing is deleted from here while
undelivered, but the entry of an upload whose object never reached the store (`ImageWithdrawn`:
that upload was never acknowledged); an entry in flight when the process died is simply still
`pending`. The functions taking `conn` are the transitions: catalog write ops (or reads) for
`catalog.write`. An entry is created, delivered and withdrawn by journal records (`ImageAccepted`,
`OutboxDelivered`, `ImageWithdrawn`), which the catalog applies (`gateway.catalog.apply`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.catalog import Conn
from gateway.forward.uplink_config import DEFAULT_CLASS

PENDING, HELD, DELIVERED, DEAD = "pending", "held", "delivered", "dead"
SKIPPED = "skipped"


class Entry(msgspec.Struct, kw_only=True):
    """A pending outbox entry with what it takes to forward it."""

    image_id: str
    seq: int
    device_id: str
    size: int
    attempts: int
    next_attempt_at: float
    batch_id: str
    filename: str
    content_type: str
    storage_key: str
    metadata: bytes | None
    xxh3_128: str
    priority_class: str = DEFAULT_CLASS


def pending_heads(conn: Conn, per_device: int) -> list[Entry]:
    """The first `per_device` pending entries of every device and class, oldest first (due or not)."""
    rows = conn.execute(
        """
        SELECT o.image_id, o.seq, o.device_id, o.size, o.attempts, o.next_attempt_at,
               i.batch_id, i.filename, i.content_type, i.storage_key, i.metadata, i.xxh3_128, o.priority_class
        FROM (SELECT *, row_number() OVER (PARTITION BY device_id, priority_class ORDER BY seq) AS rn
              FROM outbox WHERE state = 'pending') o
        JOIN images i ON i.image_id = o.image_id
        WHERE o.rn <= ? ORDER BY o.device_id, o.seq
        """,
        [per_device],
    ).fetchall()
    return [
        Entry(image_id=r[0], seq=r[1], device_id=r[2], size=r[3], attempts=r[4], next_attempt_at=r[5] or 0.0,
              batch_id=r[6], filename=r[7], content_type=r[8], storage_key=r[9],
              metadata=None if r[10] is None else bytes(r[10]), xxh3_128=r[11], priority_class=r[12] or DEFAULT_CLASS)
        for r in rows
    ]


def class_backlog(conn: Conn) -> dict[str, tuple[int, int, float | None]]:
    """Undelivered (pending or held) entries per class: count, bytes, oldest `created_at`."""
    rows = conn.execute(
        "SELECT coalesce(priority_class, 'default'), count(*), coalesce(sum(size), 0), min(created_at) FROM outbox "
        "WHERE state IN ('pending', 'held') GROUP BY ALL"
    ).fetchall()
    return {r[0]: (int(r[1]), int(r[2]), r[3]) for r in rows}


def mark_retry(conn: Conn, image_id: str, next_at: float, status: int | None, error: str) -> None:
    """pending -> pending: one more failed attempt, next one not before `next_at`."""
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_status = ?, last_error = ? "
        "WHERE image_id = ? AND state = 'pending'",
        [next_at, status, error[:2048], image_id],
    )


def mark_dead(conn: Conn, image_ids: list[str], now: float, status: int | None, error: str, count_attempt: bool) -> int:
    """pending/held -> dead, keeping the status and reason; returns how many moved."""
    if not image_ids:
        return 0
    rows = conn.execute(
        "UPDATE outbox SET state = 'dead', attempts = attempts + ?, next_attempt_at = ?, last_status = ?, "
        "last_error = ? WHERE image_id IN (SELECT unnest(?::VARCHAR[])) AND state IN ('pending', 'held') "
        "RETURNING image_id",
        [1 if count_attempt else 0, now, status, error[:2048], image_ids],
    ).fetchall()
    return len(rows)


def mark_dead_after_attempt(conn: Conn, attempted: str, image_ids: list[str], now: float, status: int | None,
                            reason: str) -> int:
    """Dead-letter `image_ids` for one reason; only `attempted` counts an attempt (the others were not sent)."""
    moved = mark_dead(conn, [attempted], now, status, reason, True)
    return moved + mark_dead(conn, [i for i in image_ids if i != attempted], now, status, reason, False)


def device_backlog(conn: Conn, device_id: str, state: str) -> list[str]:
    rows = conn.execute(
        "SELECT image_id FROM outbox WHERE device_id = ? AND state = ? ORDER BY seq", [device_id, state]
    ).fetchall()
    return [r[0] for r in rows]


def release_held(conn: Conn, device_id: str, now: float) -> int:
    """held -> pending for a device whose key the cloud confirmed."""
    rows = conn.execute(
        "UPDATE outbox SET state = 'pending', next_attempt_at = ? WHERE device_id = ? AND state = 'held' "
        "RETURNING image_id",
        [now, device_id],
    ).fetchall()
    return len(rows)


def retry_dead(conn: Conn, image_ids: list[str] | None, now: float) -> int:
    """dead -> pending with attempts reset: every dead entry (`image_ids` None) or the ones named.
    A device still in quarantine (its key never confirmed by the cloud) gets them back as held:
    only the cloud's word about the key may release them."""
    chosen = "" if image_ids is None else " AND image_id IN (SELECT unnest(?::VARCHAR[]))"
    rows = conn.execute(
        "UPDATE outbox SET attempts = 0, next_attempt_at = ?, state = CASE WHEN device_id IN "
        "(SELECT device_id FROM devices WHERE origin = 'quarantine') THEN 'held' ELSE 'pending' END "
        f"WHERE state = 'dead'{chosen} RETURNING image_id",
        [now] if image_ids is None else [now, image_ids],
    ).fetchall()
    return len(rows)


def release_skipped(conn: Conn, image_ids: list[str] | None, now: float) -> int:
    """skipped -> pending: every held near-duplicate (`image_ids` None) or the ones named."""
    sql = "UPDATE outbox SET state = 'pending', next_attempt_at = ? WHERE state = 'skipped'"
    params: list[Any] = [now]
    if image_ids is not None:
        sql += " AND image_id IN (SELECT unnest(?::VARCHAR[]))"
        params.append(image_ids)
    return len(conn.execute(sql + " RETURNING image_id", params).fetchall())


LIST_COLUMNS = ("image_id", "seq", "device_id", "size", "state", "attempts", "next_attempt_at", "last_status",
                "last_error", "created_at", "delivered_at", "filename", "cloud_image_id", "class")


def list_entries(conn: Conn, states: list[str], device_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Outbox entries in the given states, oldest first, for `gateway outbox list`."""
    sql = (
        "SELECT o.image_id, o.seq, o.device_id, o.size, o.state, o.attempts, o.next_attempt_at, o.last_status, "
        "o.last_error, o.created_at, o.delivered_at, i.filename, i.cloud_image_id, "
        "coalesce(o.priority_class, 'default') "
        "FROM outbox o JOIN images i ON i.image_id = o.image_id "
        "WHERE o.state IN (SELECT unnest(?::VARCHAR[]))"
    )
    params: list[Any] = [states]
    if device_id:
        sql += " AND o.device_id = ?"
        params.append(device_id)
    sql += " ORDER BY o.seq LIMIT ?"
    params.append(limit)
    return [dict(zip(LIST_COLUMNS, r, strict=True)) for r in conn.execute(sql, params).fetchall()]
