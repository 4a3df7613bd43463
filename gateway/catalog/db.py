"""The one owner of the DuckDB file: the writer thread (`writer.py`) for writes, cursors for reads.

DuckDB allows one read-write process per file and prefers few, larger transactions, so every write
goes through one thread that commits in groups; uploads and deliveries are journaled first
(`journal.py`) and reach DuckDB in batches, always before any read. Why, and what it measured:
docs/design.md, "The catalog writer".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import anyio
import duckdb

from gateway.catalog.apply import apply_frames
from gateway.catalog.collecting import NewImage, Placed, Stored, Withdrawn
from gateway.catalog.quarantine import Quarantined
from gateway.catalog.records import Record
from gateway.catalog.schema import migrate
from gateway.catalog.writer import (
    APPLY_DELAY_S,
    APPLY_MAX,
    LINGER_S,
    STOP,
    WAKE,
    CatalogWriter,
    Work,
    as_domain_error,
)
from gateway.errors import ServiceUnavailable, StartRefused

T = TypeVar("T")
Conn = duckdb.DuckDBPyConnection
log = logging.getLogger("gateway.catalog")

class CatalogLocked(Exception):
    """Another process (a running server) holds the catalog file."""


class Catalog(CatalogWriter):
    """The gateway's DuckDB catalog (devices, batches, images, outbox)."""

    def __init__(self, path: Path, threads: int = 1, linger: float = LINGER_S, apply_max: int = APPLY_MAX,
                 apply_delay: float = APPLY_DELAY_S, on_applied: Callable[[], None] | None = None) -> None:
        """`on_applied`: called in the writer thread when journal frames reached DuckDB."""
        super().__init__(path, linger, apply_max, apply_delay, on_applied)
        self.path = path
        self.threads = threads
        self._conn: Conn | None = None
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self._cursors: list[Conn] = []
        self._cursors_lock = threading.Lock()
        self.replayed = 0  # frames found in the journal at open (a crash left them)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = duckdb.connect(str(self.path), config={"threads": self.threads})
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise CatalogLocked(str(exc)) from exc
            raise
        migrate(self._conn)
        self._pending, self.pending_entries, self._apply_failed = [], 0, None
        try:
            self.quarantine.load()
            left = self.journal.open()
            if left:  # a crash: these were acknowledged; put them where they belong before anything reads
                _, failure = self._apply_or_set_aside(self._conn, left, replay=True)
                if failure is not None:
                    raise failure
                self.replayed = len(left)
                log.info("catalog journal: %d acknowledged write(s) replayed into the catalog", len(left))
            self.journal.reset()
        except StartRefused:
            self.journal.close()
            self._conn.close()
            self._conn = None
            raise
        except (OSError, duckdb.Error) as exc:
            self.journal.close()
            self._conn.close()
            self._conn = None
            raise ServiceUnavailable("Catalog journal could not be replayed",
                                     f"{self.journal.path} is kept as it is: {exc}"[:300]) from exc
        self._writer = threading.Thread(target=self._write_loop, args=(self._conn,), name="catalog-writer",
                                        daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Finish every queued write, checkpoint and close."""
        if self._writer is not None:
            self._queue.put(STOP)
            self._writer.join()
            self._writer = None
        with self._cursors_lock:
            for cur in self._cursors:
                with contextlib.suppress(duckdb.Error):
                    cur.close()
            self._cursors.clear()
        self.journal.close()  # anything still in it (DuckDB refused it) is replayed at the next open
        if self._conn is not None:
            try:
                self._conn.execute("CHECKPOINT")
            except duckdb.Error as exc:
                log.warning("checkpoint on close failed: %s", exc)
            self._conn.close()
            self._conn = None

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def writing(self) -> bool:
        """The writer thread takes writes (from `open` until `close` begins)."""
        return self._writer is not None

    # -- writes ----------------------------------------------------------------------------

    def submit(self, op: Callable[[Conn], T]) -> Future[T]:
        return self._enqueue(Work(op, None, Future()))

    def submit_upload(self, new: NewImage) -> Future[Placed]:
        """Record an upload (its seq and batch decided here, with its neighbours'); answered once
        journaled (fsynced)."""
        return self._enqueue(Work(None, new, Future()))

    def submit_records(self, records: list[Record]) -> Future[None]:
        """Journal `records` as one write (applied together); answered once fsynced."""
        return self._enqueue(Work(None, records, Future()))

    def submit_stored(self, image_id: str, at: float) -> Future[str | None]:
        """An upload recorded with `storing` has its object stored; answers the id of the batch
        this sealed (a closing batch that waited for it last), once that seal is fsynced."""
        return self._enqueue(Work(None, Stored(image_id, at), Future()))

    def submit_withdrawn(self, image_id: str, device_id: str, batch_id: str, size: int,
                         at: float) -> Future[str | None]:
        """An upload recorded with `storing` lost its object (or an earlier process left the row
        without one): its rows go, journaled (fsynced). Answers the id of a batch this sealed."""
        return self._enqueue(Work(None, Withdrawn(image_id=image_id, device_id=device_id, batch_id=batch_id,
                                                  size=size, at=at), Future()))

    def expect(self) -> Expected:
        """Announce a write that will follow shortly; submit it through the returned handle, or
        `cancel()` it (leaving its `with` block does), so that no group waits for it in vain."""
        with self._expected_lock:
            self._expected += 1
        return Expected(self)

    def settle(self, work: Work | None) -> Future[Any] | None:
        """An announced write arrives (`work`) or is called off (None)."""
        with self._expected_lock:  # one step, so the writer never waits for a write already queued
            self._expected -= 1
            if work is not None:
                return self._enqueue(work)
            self._queue.put(WAKE)
            return None

    def _enqueue(self, work: Work) -> Future[Any]:
        if self._writer is None:
            work.future.set_exception(ServiceUnavailable("Catalog is closed"))
        else:
            self._queue.put(work)
        return work.future

    async def write(self, op: Callable[[Conn], T]) -> T:
        """Run `op` in the writer thread inside a committed transaction; returns its result."""
        return await asyncio.wrap_future(self.submit(op))

    def write_sync(self, op: Callable[[Conn], T]) -> T:
        return self.submit(op).result()

    def probe_write(self) -> Future[None]:
        """A write through the journal (an empty frame, fsynced): fails as an upload's record
        would, e.g. 507 on a full disk; for readiness."""
        return self.submit_records([])

    async def apply_quarantined(self, ids: set[str] | None) -> tuple[list[Quarantined], dict[str, str]]:
        """Apply set-aside records again (all with `ids` None), after a fix; those DuckDB takes
        leave the quarantine. Returns them, and the reasons of those still refused."""
        applied, refused = [], {}
        for record in self.quarantine.records():
            if ids is not None and record.id not in ids:
                continue

            def op(c: Conn, held: Quarantined = record) -> None:
                apply_frames(c, [held.frame()], replay=True)

            try:
                await self.write(op)
            except Exception as exc:
                refused[record.id] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            self.quarantine.remove({record.id})
            applied.append(record)
        return applied, refused

    # -- reads -----------------------------------------------------------------------------

    def flush_sync(self) -> None:
        """Wait until every acknowledged journal frame is in DuckDB (503 if DuckDB refuses them)."""
        if self.pending_entries and self._writer is not None and threading.current_thread() is not self._writer:
            self.submit(_nothing).result()

    def cursor(self) -> Conn:
        """This thread's own cursor on the catalog (DuckDB connections are not shared by threads).
        Readers see every acknowledged write: journal frames are flushed into DuckDB first."""
        self.flush_sync()
        cur: Conn | None = getattr(self._local, "cursor", None)
        if cur is None:
            if self._conn is None:
                raise ServiceUnavailable("Catalog is closed")
            cur = self._conn.cursor()
            self._local.cursor = cur
            with self._cursors_lock:
                self._cursors.append(cur)
        return cur

    async def read(self, fn: Callable[[Conn], T]) -> T:
        return await anyio.to_thread.run_sync(self.read_sync, fn)

    def read_sync(self, fn: Callable[[Conn], T]) -> T:
        try:
            return fn(self.cursor())
        except duckdb.Error as exc:
            raise as_domain_error(exc) from exc

    def file_bytes(self) -> int:
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + ".wal"), self.journal.path):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total


class Expected:
    """A write announced to the catalog writer (see `Catalog.expect`); use once."""

    __slots__ = ("_catalog", "_open")

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._open = True

    def submit_upload(self, new: NewImage) -> Future[Placed]:
        return self._submit(Work(None, new, Future()))

    def submit_records(self, records: list[Record]) -> Future[None]:
        return self._submit(Work(None, records, Future()))

    async def write_records(self, records: list[Record]) -> None:
        await asyncio.wrap_future(self.submit_records(records))

    def submit(self, op: Callable[[Conn], T]) -> Future[T]:
        return self._submit(Work(op, None, Future()))

    def _submit(self, work: Work) -> Future[Any]:
        if not self._open:
            raise RuntimeError("this announced write was already submitted or called off")
        self._open = False
        future = self._catalog.settle(work)
        assert future is not None
        return future

    def cancel(self) -> None:
        if self._open:
            self._open = False
            self._catalog.settle(None)

    def __enter__(self) -> Expected:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _nothing(conn: Conn) -> None:
    """A write that only makes the writer flush the journal first."""
