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

from gateway.catalog.records import BatchOpened, BatchSealed, Frame, ImageAccepted, ImageWithdrawn, Record, write

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
    __slots__ = ("batch_id", "count", "device_id", "opened_at", "size", "storing")

    def __init__(self, batch_id: str, device_id: str, opened_at: float, count: int = 0, size: int = 0) -> None:
        self.batch_id, self.device_id, self.opened_at = batch_id, device_id, opened_at
        self.count, self.size = count, size
        self.storing = 0  # members recorded while their objects are being stored

    def copy(self) -> _Open:
        twin = _Open(self.batch_id, self.device_id, self.opened_at, self.count, self.size)
        twin.storing = self.storing
        return twin


class CollectingBatches:
    """Each device's collecting batch with its exact image count and bytes, kept in memory by the
    catalog writer: adding a group of uploads to batches costs no statement at all (an UPDATE of
    the batch row per group was a quarter of the recording transaction's cost). A batch
    row gets its counts when it is sealed; until then readers count its image rows
    (`batches.queries`), so what they see is always committed and exact.

    An upload is recorded while its object is still being stored (`Uploads.plan` with
    `storing`), and is then either `stored` or `withdrawn`. A batch is never sealed while a
    member's object may be missing: one filled (or due, or sealed by hand) meanwhile is *closing*,
    taking no more uploads, and is sealed when its last such member is settled.

    Every method is a catalog write op (writer thread, inside its transaction). The state is
    loaded from the catalog at first use, and again after any rolled-back transaction, which may
    have left it ahead of the catalog. All sealing of collecting batches goes through here."""

    def __init__(self, catalog: Rollbacks) -> None:
        self._catalog = catalog
        self._open: dict[str, _Open] | None = None  # device_id -> its collecting batch
        self._closing: dict[str, _Open] = {}  # batch_id -> a batch waiting for its members' objects
        self._storing: dict[str, tuple[str, str]] = {}  # image_id -> (device_id, batch_id) of such members
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
        storing: dict[str, int] = {}
        for _, batch_id in self._storing.values():
            storing[batch_id] = storing.get(batch_id, 0) + 1
        for device_id, batch_id, opened_at, count, size in rows:  # oldest first
            if str(batch_id) in self._closing:
                continue
            older = self._open.get(str(device_id))
            batch = self._open[str(device_id)] = _Open(str(batch_id), str(device_id), float(opened_at), int(count),
                                                       int(size))
            batch.storing = storing.get(batch.batch_id, 0)
            if older is not None:  # one collecting batch per device: an older one (closing when the
                self._close(conn, older, float(opened_at))  # process died, say) is sealed, or closes again
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

    def plan(self, conn: Conn, uploads: list[tuple[str, int]], now: float, max_images: int,
             storing: list[str | None] | None = None) -> Placement:
        """`place` in memory only: the batches it opens and seals are for the caller to write
        (the uploads' journal entries do). `conn` only to load the state at first use.
        `storing`: per upload, its image id if its object is still being stored (else None);
        a batch it fills is then closing rather than sealed."""
        state = self._state(conn)
        plan = Placement()
        for n, (device_id, size) in enumerate(uploads):
            batch = state.get(device_id)
            if batch is not None and batch.count >= max_images:  # filled before a crash cut its seal short
                self._full(plan, state.pop(device_id), now)
                batch = None
            if batch is None:
                batch = state[device_id] = _Open(new_batch_id(), device_id, now)
                plan.opened.append((batch.batch_id, device_id, now))
            batch.count += 1
            batch.size += size
            image_id = storing[n] if storing is not None else None
            if image_id is not None:
                batch.storing += 1
                self._storing[image_id] = (device_id, batch.batch_id)
            full = batch.count >= max_images
            plan.placed.append((batch.batch_id, full))
            if full:
                self._full(plan, state.pop(device_id), now)
        return plan

    def _full(self, plan: Placement, batch: _Open, now: float) -> None:
        if batch.storing:
            self._closing[batch.batch_id] = batch
        else:
            plan.sealed.append(self._seal_params(batch, now))

    def stored(self, conn: Conn, image_id: str, now: float) -> BatchSealed | None:
        """An upload's object is in the store: the seal of its batch, if that was closing and
        waited for it last. Unknown ids (settled already, or an earlier process's) change nothing."""
        state = self._state(conn)
        settled = self._storing.pop(image_id, None)
        if settled is None:
            return None
        batch = self._batch(state, *settled)
        return None if batch is None else self._member_settled(batch, now)

    def hold(self, conn: Conn, image_ids: list[str]) -> int:
        """At start, before the batches are first read: rows an earlier process recorded whose
        objects may be missing (leftover upload intents) count as storing, so that no batch
        holding one is sealed until it is settled (`stored` or `withdrawn`, by the
        reconciliation), not even an older collecting batch of its device. Returns how many."""
        rows = conn.execute("SELECT image_id, device_id, batch_id FROM images "
                            "WHERE image_id IN (SELECT unnest(?::VARCHAR[]))", [image_ids]).fetchall()
        for image_id, device_id, batch_id in rows:
            self._storing.setdefault(str(image_id), (str(device_id), str(batch_id)))
        self._open = None  # read again, with these counted
        self._state(conn)
        return len(rows)

    def withdrawn(self, conn: Conn, image_id: str, device_id: str, batch_id: str, size: int,
                  now: float) -> BatchSealed | None:
        """An upload's object did not get to the store: it leaves its batch (`ImageWithdrawn`).
        Returns the seal of its batch, if that was closing and waited for it last."""
        state = self._state(conn)
        was_storing = self._storing.pop(image_id, None) is not None
        batch = self._batch(state, device_id, batch_id)
        if batch is None:  # sealed already (only after a crash): the withdrawal's SQL counts it again
            return None
        batch.count -= 1
        batch.size -= size
        if batch.count == 0 and state.get(device_id) is batch:
            del state[device_id]  # its row goes with the withdrawal (empty, collecting)
            return None
        return self._member_settled(batch, now) if was_storing else None

    def _batch(self, state: dict[str, _Open], device_id: str, batch_id: str) -> _Open | None:
        batch = self._closing.get(batch_id) or state.get(device_id)
        return batch if batch is not None and batch.batch_id == batch_id else None

    def _member_settled(self, batch: _Open, now: float) -> BatchSealed | None:
        batch.storing -= 1
        if batch.storing or self._closing.get(batch.batch_id) is not batch:
            return None
        del self._closing[batch.batch_id]
        if batch.count == 0:  # every member withdrawn: its row goes with the last withdrawal
            return None
        at, count, size, sealed_id = self._seal_params(batch, now)
        return BatchSealed(batch_id=sealed_id, sealed_at=at, image_count=count, total_bytes=size)

    @staticmethod
    def _seal_params(batch: _Open, now: float) -> tuple[float, int, int, str]:
        return (now, batch.count, batch.size, batch.batch_id)

    def snapshot(self) -> object:
        """The in-memory state, for `restore` should the writes planned next never be made."""
        opened = None if self._open is None else {d: b.copy() for d, b in self._open.items()}
        return (opened, {k: b.copy() for k, b in self._closing.items()}, dict(self._storing),
                self._loaded_at_rollbacks)

    def restore(self, snap: object) -> None:
        assert isinstance(snap, tuple)
        self._open, self._closing, self._storing, self._loaded_at_rollbacks = snap

    def seal_due(self, conn: Conn, now: float, timeout_s: float) -> list[str]:
        """Seal every collecting batch opened at least `timeout_s` ago (a batch waiting for its
        members' objects closes, and is sealed when they are stored); returns those sealed now."""
        state = self._state(conn)
        due = [d for d, b in state.items() if b.opened_at <= now - timeout_s and b.count]
        sealed = [self._close(conn, state.pop(device_id), now) for device_id in due]
        return [batch_id for batch_id in sealed if batch_id is not None]

    def seal(self, conn: Conn, batch_id: str, now: float) -> str | None:
        """Seal one batch by hand; returns its state afterwards, None when there is no such batch
        ("closing" when it waits for its members' objects, and is sealed once they are stored)."""
        row = conn.execute("SELECT state, device_id FROM batches WHERE batch_id = ?", [batch_id]).fetchone()
        if row is None:
            return None
        state = self._state(conn)
        if batch_id in self._closing:
            return "closing"
        if row[0] == "collecting" and (open_batch := state.get(str(row[1]))) and open_batch.batch_id == batch_id:
            return "sealed" if self._close(conn, state.pop(str(row[1])), now) else "closing"
        return str(row[0])

    def _close(self, conn: Conn, batch: _Open, now: float) -> str | None:
        """Seal `batch` now, or once its members' objects are stored; its id if sealed now."""
        if batch.storing:
            self._closing[batch.batch_id] = batch
            return None
        self._seal_row(conn, self._seal_params(batch, now))
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
    storing: bool = False  # recorded while its object is being stored: `Stored` or `Withdrawn` follows


class Stored(msgspec.Struct, frozen=True):
    """An upload recorded with `storing` has its object in the store (`Catalog.submit_stored`)."""

    image_id: str
    at: float  # when (a batch it completes is sealed at this time)


class Withdrawn(msgspec.Struct, frozen=True, kw_only=True):
    """An upload recorded with `storing` whose object did not get to the store, or a row an
    earlier process left without its object (`Catalog.submit_withdrawn`)."""

    image_id: str
    device_id: str
    batch_id: str
    size: int
    at: float


class Placed(msgspec.Struct, frozen=True):
    """Where a recorded upload went: its batch, and whether it filled it (`sealed`: sealed at
    once, or once the objects of its uploads are all stored)."""

    seq: int
    batch_id: str
    sealed: bool


class Uploads:
    """Turns each new image, and each upload's settling, into its journal frame (catalog writer
    thread): an image gets the next `seq` and its device's collecting batch; its frame holds the
    batch it opens, the image and the seal it causes. Pure in-memory work, undone (`begin`,
    `undo`) if a run's frames never reach the journal."""

    def __init__(self, collecting: CollectingBatches) -> None:
        self.collecting = collecting
        self._seq: int | None = None
        self._undo: tuple[int | None, object] | None = None

    def load(self, conn: Conn) -> None:
        """Read the last seq and the collecting batches now (start-up) rather than at the first upload."""
        self._last_seq(conn)
        self.collecting.load(conn)

    def _last_seq(self, conn: Conn) -> int:
        if self._seq is None:
            row = conn.execute("SELECT max(seq) FROM images").fetchone()
            self._seq = int(row[0]) if row and row[0] is not None else 0
        return self._seq

    def begin(self) -> None:
        """A run of journaled writes starts: what `undo` goes back to is taken at its first change."""
        self._undo = None

    def _checkpoint(self) -> None:
        if self._undo is None:
            self._undo = (self._seq, self.collecting.snapshot())

    def place(self, conn: Conn, n: NewImage) -> tuple[Placed, Frame]:
        """The upload's seq and batch, and its frame: the batch it opens, the image, the seal it causes."""
        seq = self._last_seq(conn) + 1
        self._checkpoint()
        plan = self.collecting.plan(conn, [(n.device_id, n.size)], n.received_at, n.batch_max_images,
                                    [n.image_id if n.storing else None])
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
        self._seq = seq
        return Placed(seq=seq, batch_id=batch_id, sealed=full), write(records)

    def settle(self, conn: Conn, item: Stored | Withdrawn) -> tuple[Frame | None, str | None]:
        """The frame an upload's settling writes (its withdrawal, and the seal of a closing batch
        it was the last to wait for; None when there is nothing to write), and that batch's id."""
        self._checkpoint()
        records: list[Record] = []
        if isinstance(item, Stored):
            seal = self.collecting.stored(conn, item.image_id, item.at)
        else:
            seal = self.collecting.withdrawn(conn, item.image_id, item.device_id, item.batch_id, item.size, item.at)
            records.append(ImageWithdrawn(image_id=item.image_id, batch_id=item.batch_id))
        if seal is not None:
            records.append(seal)
        return (write(records) if records else None), (None if seal is None else seal.batch_id)

    def undo(self) -> None:
        """The frames of the run since `begin` never reached the journal: forget what it decided."""
        if self._undo is None:
            return
        self._seq, snap = self._undo
        self.collecting.restore(snap)
