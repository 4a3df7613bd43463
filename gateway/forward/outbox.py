"""The outbox: one entry per accepted image, written in the same transaction as the image row.

    pending --(2xx or 409 from the cloud)----------------------------> delivered
    pending --(408/429/5xx/transport error: attempts += 1, backoff)--> pending
    pending --(other 4xx, or forward.max_attempts reached)-----------> dead
    held    --(the cloud confirms a quarantined device's key)--------> pending
    held    --(the cloud refuses the key)----------------------------> dead
    dead    --(`gateway outbox retry`)-------------------------------> pending

Entries are sent oldest first (`seq`) within each device. Nothing is ever deleted from here
while undelivered; an entry in flight when the process died is simply still `pending`.
"""

from __future__ import annotations

from gateway.catalog import Conn

PENDING, HELD, DELIVERED, DEAD = "pending", "held", "delivered", "dead"


def enqueue(conn: Conn, image_id: str, seq: int, device_id: str, size: int, now: float, held: bool) -> None:
    conn.execute(
        "INSERT INTO outbox (image_id, seq, device_id, size, state, created_at, next_attempt_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [image_id, seq, device_id, size, HELD if held else PENDING, now, now],
    )
