"""The one owner of the DuckDB file: a single writer thread with group commit, reads on cursors.

DuckDB allows one read-write process per file and prefers few, larger transactions. Every write is
a function `op(conn) -> result` queued to the writer thread, which runs all queued ops in one
transaction and commits once (group commit). Ops must have no side effects outside the database:
if one op fails, the group is rolled back and each op is re-run in a transaction of its own, so one
bad op never fails its neighbours. Reads run in worker threads, each on its own cursor.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import anyio
import duckdb

from gateway.catalog.schema import migrate
from gateway.errors import ServiceUnavailable

T = TypeVar("T")
Conn = duckdb.DuckDBPyConnection
log = logging.getLogger("gateway.catalog")

_MAX_GROUP = 256
_STOP = object()


class CatalogLocked(Exception):
    """Another process (a running server) holds the catalog file."""


class Catalog:
    """The gateway's DuckDB catalog (devices, batches, images, outbox)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: Conn | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self._cursors: list[Conn] = []
        self._cursors_lock = threading.Lock()
        self.commits = 0
        self.ops = 0

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise CatalogLocked(str(exc)) from exc
            raise
        migrate(self._conn)
        self._writer = threading.Thread(target=self._write_loop, name="catalog-writer", daemon=True)
        self._writer.start()

    def close(self) -> None:
        """Finish every queued write, checkpoint and close."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        with self._cursors_lock:
            for cur in self._cursors:
                try:
                    cur.close()
                except duckdb.Error:
                    pass
            self._cursors.clear()
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

    # -- writes ----------------------------------------------------------------------------

    def submit(self, op: Callable[[Conn], T]) -> Future[T]:
        fut: Future[T] = Future()
        if self._writer is None:
            fut.set_exception(ServiceUnavailable("Catalog is closed"))
            return fut
        self._queue.put((op, fut))
        return fut

    async def write(self, op: Callable[[Conn], T]) -> T:
        """Run `op` in the writer thread inside a committed transaction; returns its result."""
        return await asyncio.wrap_future(self.submit(op))

    def write_sync(self, op: Callable[[Conn], T]) -> T:
        return self.submit(op).result()

    def _write_loop(self) -> None:
        assert self._conn is not None
        conn = self._conn
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            group = [item]
            while len(group) < _MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                group.append(nxt)
            self._run_group(conn, group)

    def _run_group(self, conn: Conn, group: list[tuple[Callable[[Conn], Any], Future[Any]]]) -> None:
        live = [(op, fut) for op, fut in group if fut.set_running_or_notify_cancel()]
        if not live:
            return
        results: list[Any] = []
        try:
            conn.execute("BEGIN TRANSACTION")
            for op, _ in live:
                results.append(op(conn))
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            if len(live) == 1:
                live[0][1].set_exception(_as_domain_error(exc))
                return
            for op, fut in live:
                self._run_alone(conn, op, fut)
            return
        self.commits += 1
        self.ops += len(live)
        for (_, fut), result in zip(live, results, strict=True):
            fut.set_result(result)

    def _run_alone(self, conn: Conn, op: Callable[[Conn], Any], fut: Future[Any]) -> None:
        try:
            conn.execute("BEGIN TRANSACTION")
            result = op(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            _rollback(conn)
            fut.set_exception(_as_domain_error(exc))
            return
        self.commits += 1
        self.ops += 1
        fut.set_result(result)

    # -- reads -----------------------------------------------------------------------------

    def cursor(self) -> Conn:
        """This thread's own cursor on the catalog (DuckDB connections are not shared by threads)."""
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
            raise _as_domain_error(exc) from exc

    def file_bytes(self) -> int:
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total


def _rollback(conn: Conn) -> None:
    try:
        conn.execute("ROLLBACK")
    except duckdb.Error:
        pass


def _as_domain_error(exc: BaseException) -> BaseException:
    """DuckDB failures (I/O, disk, corruption) become 503 so that a write error is never a 2xx."""
    if isinstance(exc, duckdb.Error) and not isinstance(exc, duckdb.ConstraintException):
        log.error("catalog error: %s", exc)
        return ServiceUnavailable("Catalog unavailable", str(exc)[:200])
    return exc
