"""Where the next upload goes: its `seq` and its device's collecting batch, decided in the
catalog writer thread when the upload's record is journaled (`Uploads`), from state kept in memory.

The batch lifecycle is `gateway.batches.lifecycle`; the collecting -> sealed step lives here
because the catalog writer decides it (by count) as it records the uploads, and the by-time and
by-hand seals must go through the same in-memory state.
"""

from __future__ import annotations

import uuid
from typing import Protocol

import duckdb
import msgspec

from gateway.catalog.records import BatchOpened, BatchSealed, Frame, ImageAccepted, Record, write

Conn = duckdb.DuckDBPyConnection

_OPEN_SQL = "INSERT INTO batches (batch_id, device_id, state, opened_at) VALUES (?, ?, 'collecting', ?)"
_SEAL_ONE = ("UPDATE batches SET state = 'sealed', sealed_at = ?, image_count = ?, total_bytes = ? "
             "WHERE batch_id = ? AND state = 'collecting'")


class Rollbacks(Protocol):
    """The catalog writer's count of rolled-back transactions (in-memory state is stale after one)."""

    @property
    def rollbacks(self) -> int: ...


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4()}"


class _Open:
    __slots__ = ("batch_id", "count", "opened_at", "size")

    def __init__(self, batch_id: str, opened_at: float, count: int = 0, size: int = 0) -> None:
        self.batch_id, self.opened_at, self.count, self.size = batch_id, opened_at, count, size


class CollectingBatches:
    """Each device's collecting batch with its exact image count and bytes, kept in memory by the
    catalog writer: adding a group of uploads to batches costs no statement at all (an UPDATE of
    the batch row per group was a quarter of the recording transaction's cost). A batch
    row gets its counts when it is sealed; until then readers count its image rows
    (`batches.queries`), so what they see is always committed and exact.

    Every method is a catalog write op (writer thread, inside its transaction). The state is
    loaded from the catalog at first use, and again after any rolled-back transaction, which may
    have left it ahead of the catalog. All sealing of collecting batches goes through here."""

    def __init__(self, catalog: Rollbacks) -> None:
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
            conn.execute(_OPEN_SQL, [batch_id, device_id, opened_at])
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
                plan.sealed.append((now, batch.count, batch.size, batch.batch_id))
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
        if row[0] == "collecting" and (open_batch := state.get(str(row[1]))) and open_batch.batch_id == batch_id:
            self._seal(conn, state.pop(str(row[1])), now)
            return "sealed"
        return str(row[0])

    def _seal(self, conn: Conn, batch: _Open, now: float) -> str:
        self._seal_row(conn, (now, batch.count, batch.size, batch.batch_id))
        return batch.batch_id

    @staticmethod
    def _seal_row(conn: Conn, params: tuple[float, int, int, str]) -> None:
        done = conn.execute(_SEAL_ONE, list(params)).fetchone()
        if not done or done[0] != 1:  # out of step with the catalog: roll back, and reload
            raise RuntimeError(f"collecting batch {params[-1]} is not collecting in the catalog")


class Placement:
    """What `CollectingBatches.plan` decided: per upload (batch_id, filled it); batches opened as
    (batch_id, device_id, opened_at); batches sealed as
    [sealed_at, image_count, total_bytes, batch_id]."""

    __slots__ = ("opened", "placed", "sealed")

    def __init__(self) -> None:
        self.placed: list[tuple[str, bool]] = []
        self.opened: list[tuple[str, str, float]] = []
        self.sealed: list[tuple[float, int, int, str]] = []


class NewImage(msgspec.Struct, frozen=True, kw_only=True):
    """An upload to record (`Catalog.submit_upload`): everything but its seq and batch."""

    image_id: str
    device_id: str
    filename: str
    content_type: str
    size: int
    xxh3_128: str
    storage_key: str
    metadata: bytes | None
    received_at: float
    outbox_state: str  # pending, held (a quarantined device) or skipped (a near-duplicate held at the edge)
    batch_max_images: int  # the batch this upload fills to this many is sealed
    fingerprint: int | None = None
    near_duplicate_of: str | None = None
    priority_class: str = "default"  # the forward class it matched at ingest (forward.classes)


class Placed(msgspec.Struct, frozen=True):
    """Where a recorded upload went: its batch, and whether it filled (sealed) it."""

    seq: int
    batch_id: str
    sealed: bool


class Uploads:
    """Turns a group of new images into journal frames (catalog writer thread): each gets the
    next `seq` and its device's collecting batch; a frame holds the batch it opens, the image
    and the seal it causes. Pure in-memory work, undone if the frames never reach the journal."""

    def __init__(self, collecting: CollectingBatches) -> None:
        self.collecting = collecting
        self._seq: int | None = None
        self._undo: tuple[int | None, object] = (None, None)

    def load(self, conn: Conn) -> None:
        """Read the last seq and the collecting batches now (start-up) rather than at the first upload."""
        self._last_seq(conn)
        self.collecting.load(conn)

    def _last_seq(self, conn: Conn) -> int:
        if self._seq is None:
            row = conn.execute("SELECT max(seq) FROM images").fetchone()
            self._seq = int(row[0]) if row and row[0] is not None else 0
        return self._seq

    def plan(self, conn: Conn, items: list[NewImage]) -> tuple[list[Placed], list[Frame]]:
        self._undo = (self._seq, self.collecting.snapshot())
        seq = self._last_seq(conn)
        placed, frames = [], []
        for n in items:
            seq += 1
            plan = self.collecting.plan(conn, [(n.device_id, n.size)], n.received_at, n.batch_max_images)
            ((batch_id, full),) = plan.placed
            records: list[Record] = [BatchOpened(batch_id=b, device_id=d, opened_at=at) for b, d, at in plan.opened]
            records.append(ImageAccepted(
                image_id=n.image_id, seq=seq, batch_id=batch_id, device_id=n.device_id, filename=n.filename,
                content_type=n.content_type, size=n.size, xxh3_128=n.xxh3_128, storage_key=n.storage_key,
                metadata=n.metadata, received_at=n.received_at, fingerprint=n.fingerprint,
                near_duplicate_of=n.near_duplicate_of, outbox_state=n.outbox_state,
                priority_class=n.priority_class))
            for at, count, size, sealed_id in plan.sealed:
                records.append(BatchSealed(batch_id=sealed_id, sealed_at=at, image_count=count, total_bytes=size))
            placed.append(Placed(seq=seq, batch_id=batch_id, sealed=full))
            frames.append(write(records))
        self._seq = seq
        return placed, frames

    def undo(self) -> None:
        """The frames of the last `plan` never reached the journal: forget what it decided."""
        self._seq, snap = self._undo
        self.collecting.restore(snap)
