"""The catalog's one writer thread: group commit for ops, one fsync per group for journaled writes.

Ops (`op(conn) -> result`) queued together run in one transaction; if one fails, each is re-run
alone so that one bad op never fails its neighbours. Journaled writes (uploads and their settling,
deliveries) are typed: the writer turns a run of them into journal frames with catalog code only
(`Uploads` gives an upload its seq and batch), appends them with one fsync and answers; the frames
reach DuckDB in large batches (`apply_max`, or `apply_delay` after the first), always before any
other write runs and before any read. While announced writes are on their way (`expect`), a group may wait
up to `linger` for them, as PostgreSQL's `commit_delay` does.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import duckdb

from gateway.catalog.apply import apply_frames
from gateway.catalog.collecting import CollectingBatches, NewImage, Stored, Uploads, Withdrawn
from gateway.catalog.journal import Journal, frame
from gateway.catalog.quarantine import JournalQuarantine, record_refused
from gateway.catalog.records import Frame, Record, write
from gateway.errors import GatewayError, InsufficientStorage, ServiceUnavailable
from gateway.system.osthread import name_this_thread

Conn = duckdb.DuckDBPyConnection
log = logging.getLogger("gateway.catalog")

_MAX_GROUP = 256
LINGER_S = 0.002  # how long a group may wait for announced writes (docs/design.md, "The catalog writer")
APPLY_MAX = 512  # journal frames are moved into DuckDB in one transaction once this many wait...
APPLY_DELAY_S = 0.25  # ...and at the latest this long after the first of them was acknowledged
APPLY_RETRY_S = 1.0  # while DuckDB refuses them, the writer retries on its own this often
STOP = object()
WAKE = object()  # an announced write was called off: a lingering group need not wait for it

# An upload to place, an upload's settling (its object stored, or withdrawn), or records as they are.
Journaled = NewImage | Stored | Withdrawn | list[Record]


class Work:
    """An op `fn(conn)`, or a journaled write."""

    __slots__ = ("fn", "future", "item")

    def __init__(self, fn: Callable[[Conn], Any] | None, item: Journaled | None, future: Future[Any]) -> None:
        self.fn = fn
        self.item = item
        self.future = future


class CatalogWriter:
    """The writer thread's state and loop; `Catalog` adds opening, reads and the public API."""

    def __init__(self, path: Path, linger: float, apply_max: int, apply_delay: float,
                 on_applied: Callable[[], None] | None = None) -> None:
        self.linger = linger
        self.apply_max = apply_max
        self.apply_delay = apply_delay
        self._expected = 0  # announced writes not yet queued (see `Catalog.expect`)
        self._expected_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.commits = 0
        self.ops = 0
        self.rollbacks = 0  # writer-thread state kept in memory is stale after one (see CollectingBatches)
        self.journal = Journal(path.with_name(path.name + ".journal"))
        self.quarantine = JournalQuarantine(path.with_name(path.name + ".journal.quarantine"))
        self.collecting = CollectingBatches(self)  # writer-thread state; sealing goes through it too
        self.uploads = Uploads(self.collecting)
        self._pending: list[Frame] = []  # acknowledged, not yet in DuckDB (writer thread)
        self.pending_entries = 0  # len(_pending), read by other threads
        self._pending_since = 0.0
        self._apply_failed: BaseException | None = None
        self._retry_at = 0.0
        self.on_applied = on_applied  # journal frames reached DuckDB (writer thread)

    def _write_loop(self, conn: Conn) -> None:
        name_this_thread("catalog-writer")
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=self._apply_wait()) if self._pending else self._queue.get()
            except queue.Empty:  # the oldest journal frame has waited long enough
                self._apply_pending(conn)
                continue
            if item is STOP:
                break
            if item is WAKE:
                continue
            group: list[Work] = [item]
            stopping = self._gather(group, None)
            if not stopping and self.linger > 0:
                stopping = self._gather(group, time.monotonic() + self.linger)
            self._run_group(conn, group)
            if len(self._pending) >= self.apply_max or (self._pending and self._apply_wait() <= 0):
                self._apply_pending(conn)
        self._apply_pending(conn)

    def _apply_wait(self) -> float:
        due = self._retry_at if self._apply_failed else self._pending_since + self.apply_delay
        return max(0.0, due - time.monotonic())

    def _gather(self, group: list[Work], linger_until: float | None) -> bool:
        """Add queued works to `group`: those queued now or, with `linger_until`, those arriving
        until then while announced writes are outstanding. True if a stop arrived."""
        while len(group) < _MAX_GROUP:
            try:
                if linger_until is None:
                    nxt = self._queue.get_nowait()
                elif self._expected > 0 and (left := linger_until - time.monotonic()) > 0:
                    nxt = self._queue.get(timeout=left)
                else:
                    break
            except queue.Empty:
                break
            if nxt is STOP:
                return True
            if nxt is not WAKE:
                group.append(nxt)
        return False

    def _run_group(self, conn: Conn, group: list[Work]) -> None:
        """Runs of journaled writes go to the journal; ops run in a transaction, after every
        journal frame before them has reached DuckDB."""
        live = [w for w in group if w.future.set_running_or_notify_cancel()]
        i = 0
        while i < len(live):
            journaled = live[i].fn is None
            j = i + 1
            while j < len(live) and (live[j].fn is None) == journaled:
                j += 1
            if journaled:
                self._journal_run(conn, live[i:j])
            elif self._apply_pending(conn):
                self._run_ops(conn, live[i:j])
            else:
                for work in live[i:j]:
                    work.future.set_exception(self._refusal())
            i = j

    def _journal_run(self, conn: Conn, works: list[Work]) -> None:
        if self._apply_failed and not self._apply_pending(conn):
            for work in works:  # DuckDB refuses what is pending: acknowledge nothing more on top
                work.future.set_exception(self._refusal())
            return
        self.uploads.begin()
        try:
            results: list[Any] = []
            frames: list[Frame] = []
            for work in works:  # in their order: a withdrawal and the upload after it see the same batch
                if isinstance(work.item, NewImage):
                    placed, upload_frame = self.uploads.place(conn, work.item)
                    results.append(placed)
                    frames.append(upload_frame)
                elif isinstance(work.item, Stored | Withdrawn):
                    settled, sealed = self.uploads.settle(conn, work.item)
                    results.append(sealed)
                    if settled is not None:
                        frames.append(settled)
                else:
                    results.append(None)
                    frames.append(write(work.item or []))
            if frames:  # an object stored that seals nothing writes nothing
                self.journal.append([frame(f) for f in frames])
        except Exception as exc:
            self.uploads.undo()
            error: BaseException = journal_error(exc) if isinstance(exc, OSError) else as_domain_error(exc)
            if isinstance(exc, OSError):
                log.error("catalog journal write failed: %s", exc)
            for work in works:
                work.future.set_exception(error)
            return
        frames = [f for f in frames if f.records]  # a probe's empty frame
        if not frames and not self._pending:
            self.journal.reset()  # everything before it is in DuckDB already
        if frames and not self._pending:
            self._pending_since = time.monotonic()
        self._pending.extend(frames)
        self.pending_entries = len(self._pending)
        self.ops += len(works)
        for work, result in zip(works, results, strict=True):
            work.future.set_result(result)

    def _apply_pending(self, conn: Conn) -> bool:
        """Move every acknowledged journal frame into DuckDB in one transaction; False if DuckDB
        refused (the frames stay pending, and in the journal)."""
        if not self._pending:
            return True
        remaining, exc = self._apply_or_set_aside(conn, self._pending, replay=False)
        if exc is not None:
            self._pending[:] = remaining  # those before were committed (or set aside)
            self.pending_entries = len(self._pending)
            if not self._apply_failed:
                log.error("catalog: %d journaled write(s) could not be applied yet: %s", len(self._pending), exc)
            self._apply_failed = exc
            self._retry_at = time.monotonic() + APPLY_RETRY_S  # meanwhile only a new write or read retries
            return False
        self._pending.clear()
        self.pending_entries = 0
        self._apply_failed = None
        try:
            self.journal.reset()
        except OSError as exc:  # the frames are replayed at the next open, harmlessly
            log.warning("catalog journal could not be emptied: %s", exc)
        if self.on_applied is not None:
            try:
                self.on_applied()
            except Exception:  # a listener's trouble is not the writer's
                log.exception("catalog: on_applied failed")
        return True

    def _apply_or_set_aside(self, conn: Conn, frames: list[Frame], replay: bool
                            ) -> tuple[list[Frame], BaseException | None]:
        """Journal frames into DuckDB: all in one transaction or, if DuckDB refuses, one by one,
        setting aside (`quarantine`) each it refuses for the record's own reason. Returns the
        frames not applied and why: a failure of the disk or the database stops there."""
        try:
            self._transaction(conn, frames, replay)
            return [], None
        except Exception as exc:
            if not record_refused(exc):
                return frames, exc
        for i, one in enumerate(frames):
            try:
                self._transaction(conn, [one], replay)
            except Exception as exc:
                if not record_refused(exc):
                    return frames[i:], exc
                try:
                    self.quarantine.add(one, f"{type(exc).__name__}: {exc}")
                except OSError as io_exc:
                    return frames[i:], io_exc
        return [], None

    def _transaction(self, conn: Conn, frames: list[Frame], replay: bool) -> None:
        try:
            conn.execute("BEGIN TRANSACTION")
            apply_frames(conn, frames, replay=replay)
            conn.execute("COMMIT")
        except Exception:
            with contextlib.suppress(duckdb.Error):
                conn.execute("ROLLBACK")
            raise
        self.commits += 1

    def _refusal(self) -> GatewayError:
        if _disk_full(self._apply_failed):
            return InsufficientStorage("Catalog disk is full", "no room to write the catalog")
        return ServiceUnavailable("Catalog unavailable", str(self._apply_failed)[:200])

    def _run_ops(self, conn: Conn, live: list[Work]) -> None:
        try:
            conn.execute("BEGIN TRANSACTION")
            results = [self._call(conn, work) for work in live]
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            if len(live) == 1:
                live[0].future.set_exception(as_domain_error(exc))
                return
            for work in live:
                self._run_alone(conn, work)
            return
        self.commits += 1
        self.ops += len(live)
        for work, result in zip(live, results, strict=True):
            work.future.set_result(result)

    @staticmethod
    def _call(conn: Conn, work: Work) -> Any:
        assert work.fn is not None  # journaled works never come here
        return work.fn(conn)

    def _run_alone(self, conn: Conn, work: Work) -> None:
        try:
            conn.execute("BEGIN TRANSACTION")
            result = self._call(conn, work)
            conn.execute("COMMIT")
        except Exception as exc:
            self._rollback(conn)
            work.future.set_exception(as_domain_error(exc))
            return
        self.commits += 1
        self.ops += 1
        work.future.set_result(result)

    def _rollback(self, conn: Conn) -> None:
        with contextlib.suppress(duckdb.Error):
            conn.execute("ROLLBACK")
        self.rollbacks += 1


def as_domain_error(exc: BaseException) -> BaseException:
    """DuckDB failures (I/O, disk, corruption) become 503, a full disk 507, so that a write error
    is never a 2xx."""
    if isinstance(exc, duckdb.Error) and not isinstance(exc, duckdb.ConstraintException):
        log.error("catalog error: %s", exc)
        if _disk_full(exc):
            return InsufficientStorage("Catalog disk is full", "no room to write the catalog")
        return ServiceUnavailable("Catalog unavailable", str(exc)[:200])
    return exc


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# DuckDB reports the OS error only as text (no errno on its exceptions).
_FULL_TEXTS = (os.strerror(errno.ENOSPC).lower(), os.strerror(errno.EDQUOT).lower())


def _disk_full(exc: BaseException | None) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    return isinstance(exc, duckdb.Error) and any(t in str(exc).lower() for t in _FULL_TEXTS)


def journal_error(exc: OSError) -> GatewayError:
    """A journal write that failed: 507 for a full disk or quota, else 503."""
    if _disk_full(exc):
        return InsufficientStorage("Catalog disk is full", "no room for the catalog journal")
    return ServiceUnavailable("Catalog unavailable", f"journal: {exc}"[:200])
