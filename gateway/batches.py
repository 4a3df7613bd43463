"""Batch lifecycle: every batch state transition lives in this module.

    collecting --(holds batches.max_images | batches.timeout_s since opened | `batches seal`)--> sealed
    sealed     --(every image delivered to the cloud, or forwarding is off)--------------------> forwarded
    forwarded  --(a sync job acks it)---------------------------------------------------------> drained

Each device has at most one `collecting` batch; the first upload with none opens one. The
functions taking `conn` are catalog write ops (run inside the writer's transaction); the
`BatchSealer` is the background loop that seals batches by time even when no upload arrives.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable

import anyio

from gateway.catalog import Catalog, Conn

log = logging.getLogger("gateway.batches")

COLLECTING, SEALED, FORWARDED, DRAINED = "collecting", "sealed", "forwarded", "drained"
STATES = (COLLECTING, SEALED, FORWARDED, DRAINED)


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4()}"


def join_collecting_batch(conn: Conn, device_id: str, size: int, now: float, max_images: int) -> tuple[str, bool]:
    """Add one image to the device's collecting batch (opening one if needed).

    Returns the batch id and whether this image filled the batch (it is then sealed)."""
    row = conn.execute(
        "SELECT batch_id, image_count FROM batches WHERE device_id = ? AND state = 'collecting' "
        "ORDER BY opened_at DESC LIMIT 1",
        [device_id],
    ).fetchone()
    if row is None:
        batch_id, count = new_batch_id(), 0
        conn.execute(
            "INSERT INTO batches (batch_id, device_id, state, opened_at) VALUES (?, ?, 'collecting', ?)",
            [batch_id, device_id, now],
        )
    else:
        batch_id, count = row[0], int(row[1])
    full = count + 1 >= max_images
    conn.execute(
        "UPDATE batches SET image_count = image_count + 1, total_bytes = total_bytes + ?, "
        "state = CASE WHEN ? THEN 'sealed' ELSE state END, sealed_at = CASE WHEN ? THEN ? ELSE sealed_at END "
        "WHERE batch_id = ?",
        [size, full, full, now, batch_id],
    )
    return batch_id, full


def seal_due_batches(conn: Conn, now: float, timeout_s: float) -> list[str]:
    """Seal every collecting batch opened at least `timeout_s` ago; returns their ids."""
    rows = conn.execute(
        "UPDATE batches SET state = 'sealed', sealed_at = ? "
        "WHERE state = 'collecting' AND opened_at <= ? RETURNING batch_id",
        [now, now - timeout_s],
    ).fetchall()
    return [r[0] for r in rows]


def seal_batch(conn: Conn, batch_id: str, now: float) -> str | None:
    """Seal one batch by hand; returns its state afterwards, None when there is no such batch."""
    row = conn.execute("SELECT state FROM batches WHERE batch_id = ?", [batch_id]).fetchone()
    if row is None:
        return None
    if row[0] == COLLECTING:
        conn.execute("UPDATE batches SET state = 'sealed', sealed_at = ? WHERE batch_id = ?", [now, batch_id])
        return SEALED
    return str(row[0])


def mark_forwarded_when_delivered(conn: Conn, now: float, forwarding_on: bool) -> list[str]:
    """Move sealed batches whose images all reached the cloud (or all sealed batches when
    forwarding is off) to `forwarded`; returns their ids."""
    if not forwarding_on:
        rows = conn.execute(
            "UPDATE batches SET state = 'forwarded', forwarded_at = ? WHERE state = 'sealed' RETURNING batch_id",
            [now],
        ).fetchall()
        return [r[0] for r in rows]
    rows = conn.execute(
        """
        UPDATE batches SET state = 'forwarded', forwarded_at = ?
        WHERE state = 'sealed' AND NOT EXISTS (
            SELECT 1 FROM images i JOIN outbox o ON o.image_id = i.image_id
            WHERE i.batch_id = batches.batch_id AND o.state <> 'delivered')
        RETURNING batch_id
        """,
        [now],
    ).fetchall()
    return [r[0] for r in rows]


def mark_drained(conn: Conn, batch_id: str, now: float) -> str | None:
    """A sync job acked the batch. Idempotent: a drained batch stays as it is.

    Returns the state afterwards (None: no such batch); only `forwarded` batches move."""
    row = conn.execute("SELECT state FROM batches WHERE batch_id = ?", [batch_id]).fetchone()
    if row is None:
        return None
    if row[0] == FORWARDED:
        conn.execute("UPDATE batches SET state = 'drained', drained_at = ? WHERE batch_id = ?", [now, batch_id])
        return DRAINED
    return str(row[0])


SealedHook = Callable[[list[str]], Awaitable[None]]


class BatchSealer:
    """Seals batches by time, and moves sealed ones to forwarded, without waiting for uploads."""

    def __init__(
        self,
        catalog: Catalog,
        timeout_s: float,
        forwarding_on: bool,
        clock: Callable[[], float],
        on_sealed: SealedHook | None = None,
    ) -> None:
        self.catalog = catalog
        self.timeout_s = timeout_s
        self.forwarding_on = forwarding_on
        self.clock = clock
        self.on_sealed = on_sealed
        # Check often enough that a batch is sealed within ~1 s (or 5 % of the timeout) of its due time.
        self.interval_s = max(0.2, min(5.0, math.ceil(timeout_s * 50) / 1000))

    async def tick(self) -> list[str]:
        now = self.clock()
        sealed = await self.catalog.write(lambda c: seal_due_batches(c, now, self.timeout_s))
        await self.catalog.write(lambda c: mark_forwarded_when_delivered(c, now, self.forwarding_on))
        if sealed:
            log.info("sealed %d batch(es) by time", len(sealed))
            if self.on_sealed is not None:
                await self.on_sealed(sealed)
        return sealed

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the loop must survive a passing catalog error
                log.exception("batch sealer tick failed")
            await anyio.sleep(self.interval_s)
