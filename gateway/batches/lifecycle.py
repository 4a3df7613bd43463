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

log = logging.getLogger("gateway.batches.lifecycle")

COLLECTING, SEALED, FORWARDED, DRAINED = "collecting", "sealed", "forwarded", "drained"
STATES = (COLLECTING, SEALED, FORWARDED, DRAINED)


# A collecting batch opens, and fills. In the uploads' journal entries the opening is a row
# (inserted OR IGNORE on replay) and the seal this statement, which a replay may run twice.
OPEN_SQL = "INSERT INTO batches (batch_id, device_id, state, opened_at) VALUES (?, ?, 'collecting', ?)"
OPEN_COLUMNS = ("batch_id", "device_id", "state", "opened_at")
SEAL_SQL = ("UPDATE batches SET state = 'sealed', sealed_at = ?, image_count = ?, total_bytes = ? "
            "WHERE batch_id = ? AND state = 'collecting'")


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4()}"


class _Open:
    __slots__ = ("batch_id", "count", "opened_at", "size")

    def __init__(self, batch_id: str, opened_at: float, count: int = 0, size: int = 0) -> None:
        self.batch_id, self.opened_at, self.count, self.size = batch_id, opened_at, count, size


class CollectingBatches:
    """Each device's collecting batch with its exact image count and bytes, kept in memory by the
    catalog writer: adding a group of uploads to batches costs no statement at all (an UPDATE of
    the batch row per group was a quarter of the recording transaction; docs/design.md). A batch
    row gets its counts when it is sealed; until then readers count its image rows
    (`batch_queries`), so what they see is always committed and exact.

    Every method is a catalog write op (writer thread, inside its transaction). The state is
    loaded from the catalog at first use, and again after any rolled-back transaction, which may
    have left it ahead of the catalog. All sealing of collecting batches goes through here."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._open: dict[str, _Open] | None = None
        self._loaded_at_rollbacks = -1

    def _state(self, conn: Conn) -> dict[str, _Open]:
        if self._open is not None and self._loaded_at_rollbacks == self._catalog.rollbacks:
            return self._open
        rows = conn.execute(
            "SELECT b.device_id, b.batch_id, b.opened_at, count(i.image_id), coalesce(sum(i.size), 0) "
            "FROM batches b LEFT JOIN images i ON i.batch_id = b.batch_id WHERE b.state = 'collecting' "
            "GROUP BY b.device_id, b.batch_id, b.opened_at ORDER BY b.opened_at"
        ).fetchall()
        self._open = {}
        self._loaded_at_rollbacks = self._catalog.rollbacks
        for device_id, batch_id, opened_at, count, size in rows:  # oldest first
            older = self._open.get(str(device_id))
            self._open[str(device_id)] = _Open(str(batch_id), float(opened_at), int(count), int(size))
            if older is not None:  # one collecting batch per device: an older one (never expected) is sealed
                self._seal(conn, older, float(opened_at))
        return self._open

    def load(self, conn: Conn) -> int:
        """Read the collecting batches now (at start-up) rather than at the first upload; returns how many."""
        return len(self._state(conn))

    def place(self, conn: Conn, uploads: list[tuple[str, int]], now: float, max_images: int) -> list[tuple[str, bool]]:
        """Add each (device_id, size) upload to its device's collecting batch, opening one where
        none is collecting. Returns, per upload, its batch id and whether it filled (and so
        sealed) the batch. Statements only for a batch that opens or fills."""
        plan = self.plan(conn, uploads, now, max_images)
        for batch_id, device_id, opened_at in plan.opened:
            conn.execute(OPEN_SQL, [batch_id, device_id, opened_at])
        for params in plan.sealed:
            self._seal_row(conn, params)
        return plan.placed

    def plan(self, conn: Conn, uploads: list[tuple[str, int]], now: float, max_images: int) -> Placement:
        """`place` in memory only: the batches it opens and seals are for the caller to write
        (the uploads' journal entries do). `conn` only to load the state at first use."""
        state = self._state(conn)
        plan = Placement()
        for device_id, size in uploads:
            batch = state.get(device_id)
            if batch is None:
                batch = state[device_id] = _Open(new_batch_id(), now)
                plan.opened.append((batch.batch_id, device_id, now))
            batch.count += 1
            batch.size += size
            full = batch.count >= max_images
            plan.placed.append((batch.batch_id, full))
            if full:
                state.pop(device_id)
                plan.sealed.append([now, batch.count, batch.size, batch.batch_id])
        return plan

    def snapshot(self) -> object:
        """The in-memory state, for `restore` should the writes planned next never be made."""
        if self._open is None:
            return None
        return ({d: _Open(b.batch_id, b.opened_at, b.count, b.size) for d, b in self._open.items()},
                self._loaded_at_rollbacks)

    def restore(self, snap: object) -> None:
        if snap is None:
            self._open = None
            return
        assert isinstance(snap, tuple)
        self._open, self._loaded_at_rollbacks = snap

    def seal_due(self, conn: Conn, now: float, timeout_s: float) -> list[str]:
        """Seal every collecting batch opened at least `timeout_s` ago; returns their ids."""
        state = self._state(conn)
        due = [d for d, b in state.items() if b.opened_at <= now - timeout_s]
        return [self._seal(conn, state.pop(device_id), now) for device_id in due]

    def seal(self, conn: Conn, batch_id: str, now: float) -> str | None:
        """Seal one batch by hand; returns its state afterwards, None when there is no such batch."""
        row = conn.execute("SELECT state, device_id FROM batches WHERE batch_id = ?", [batch_id]).fetchone()
        if row is None:
            return None
        state = self._state(conn)
        if row[0] == COLLECTING and (open_batch := state.get(str(row[1]))) and open_batch.batch_id == batch_id:
            self._seal(conn, state.pop(str(row[1])), now)
            return SEALED
        return str(row[0])

    def _seal(self, conn: Conn, batch: _Open, now: float) -> str:
        self._seal_row(conn, [now, batch.count, batch.size, batch.batch_id])
        return batch.batch_id

    @staticmethod
    def _seal_row(conn: Conn, params: list[object]) -> None:
        done = conn.execute(SEAL_SQL, params).fetchone()
        if not done or done[0] != 1:  # out of step with the catalog: roll back, and reload
            raise RuntimeError(f"collecting batch {params[-1]} is not collecting in the catalog")


class Placement:
    """What `CollectingBatches.plan` decided: per upload (batch_id, filled it); batches opened as
    (batch_id, device_id, opened_at); batches sealed as SEAL_SQL parameters."""

    __slots__ = ("opened", "placed", "sealed")

    def __init__(self) -> None:
        self.placed: list[tuple[str, bool]] = []
        self.opened: list[tuple[str, str, float]] = []
        self.sealed: list[list[object]] = []


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
