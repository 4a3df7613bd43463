"""Batch lifecycle: every batch state transition lives in this module.

    collecting --(holds batches.max_images | batches.timeout_s since opened | `batches seal`)--> sealed
    sealed     --(every image delivered to the cloud, or forwarding is off)--------------------> forwarded
    forwarded  --(a sync job acks it)---------------------------------------------------------> drained

Each device has at most one `collecting` batch; the first upload with none opens one. Which batch
an upload joins, and the seal by count, are decided by the catalog writer as it records the upload
(`gateway.catalog.collecting`), which every seal goes through. The functions taking `conn` are
catalog write ops (run inside the writer's transaction); the `BatchSealer` is the background loop
that seals batches by time even when no upload arrives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import anyio

from gateway.catalog import Catalog, Conn
from gateway.catalog.collecting import CollectingBatches

log = logging.getLogger("gateway.batches.lifecycle")

COLLECTING, SEALED, FORWARDED, DRAINED = "collecting", "sealed", "forwarded", "drained"
STATES = (COLLECTING, SEALED, FORWARDED, DRAINED)


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
            WHERE i.batch_id = batches.batch_id AND o.state NOT IN ('delivered', 'skipped'))
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
        collecting: CollectingBatches,
        timeout_s: float,
        forwarding_on: bool,
        clock: Callable[[], float],
        on_sealed: SealedHook | None = None,
        on_forwarded: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.collecting = collecting
        self.timeout_s = timeout_s
        self.forwarding_on = forwarding_on
        self.clock = clock
        self.on_sealed = on_sealed
        self.on_forwarded = on_forwarded
        # Check often enough that a batch is sealed within ~1 s (or 5 % of the timeout) of its due time.
        self.interval_s = max(0.2, min(5.0, math.ceil(timeout_s * 50) / 1000))
        self._wake: anyio.Event | None = None

    async def tick(self) -> list[str]:
        now = self.clock()
        sealed = await self.catalog.write(lambda c: self.collecting.seal_due(c, now, self.timeout_s))
        forwarded = await self.catalog.write(lambda c: mark_forwarded_when_delivered(c, now, self.forwarding_on))
        if forwarded and self.forwarding_on and self.on_forwarded is not None:
            self.on_forwarded(forwarded)  # every cloud id is known now: time for the final manifest
        if sealed:
            log.info("sealed %d batch(es) by time", len(sealed))
            if self.on_sealed is not None:
                await self.on_sealed(sealed)
        return sealed

    def wake(self) -> None:
        """A batch was sealed by count or by hand: move it on now rather than at the next tick
        (with forwarding off a sealed batch is drainable at once)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake = anyio.Event()
            try:
                await self.tick()
            except Exception:  # the loop must survive a passing catalog error
                log.exception("batch sealer tick failed")
            with anyio.move_on_after(self.interval_s):
                await self._wake.wait()
