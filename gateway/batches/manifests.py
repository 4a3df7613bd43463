"""Batch manifests: one Parquet file per sealed batch, `batches/<batch_id>/manifest.parquet`.

DuckDB writes it (`COPY (SELECT ...) TO ... (FORMAT parquet)`, reading through this thread's
cursor, never the writer) into a temp file under `<data>/manifests.tmp`; the bytes then go to the
object store and `batches.manifest_key/manifest_at` are recorded. A manifest is *stale* when it is
missing or when the number of cloud image ids it holds (`batches.manifest_cloud_ids`) differs from
the catalog's: the forwarder records cloud ids after sealing, so stale manifests are rewritten.

Who asks for a write: the upload that fills a batch and the `BatchSealer` (through `sealed`/
`sealed_many`), the forwarder when cloud ids arrive (`request`), the sync API before serving a
manifest (`current_manifest`), and the writer itself at start-up and every few minutes (a scan
for stale manifests, so a request lost in a crash is never lost for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import duckdb

from gateway.batches.lifecycle import COLLECTING
from gateway.batches.queries import ROW_FIELDS, manifest_select
from gateway.catalog import Catalog, Conn
from gateway.errors import Conflict, NotFound, ServiceUnavailable
from gateway.ops.metrics import Metrics
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.batches.manifests")

CONTENT_TYPE = "application/vnd.apache.parquet"
COLUMNS = ROW_FIELDS  # the manifest row schema (gateway.batches.queries)
_MANIFEST_SELECT = manifest_select(parquet=True)
# Sealed and forwarded batches only: cloud ids are final once a batch is forwarded, and a drained
# batch's manifest was current when the sync job fetched it. Keeps the periodic scan cheap.
_STALE = """
    SELECT b.batch_id FROM batches b
    LEFT JOIN (
        SELECT batch_id, count(cloud_image_id) AS cloud_ids FROM images
        WHERE batch_id IN (SELECT batch_id FROM batches WHERE state IN ('sealed', 'forwarded'))
        GROUP BY batch_id
    ) i ON i.batch_id = b.batch_id
    WHERE b.state IN ('sealed', 'forwarded')
      AND (b.manifest_key IS NULL OR b.manifest_cloud_ids IS DISTINCT FROM coalesce(i.cloud_ids, 0))
    ORDER BY b.opened_at
"""
RETRY_S = 5.0
RESCAN_EVERY_S = 300.0


def manifest_key(batch_id: str) -> str:
    return f"batches/{batch_id}/manifest.parquet"


def stale_manifests(conn: Conn) -> list[str]:
    """Sealed or forwarded batches whose manifest is missing or lacks cloud ids the catalog knows."""
    return [r[0] for r in conn.execute(_STALE).fetchall()]


def _record(conn: Conn, batch_id: str, key: str, now: float, cloud_ids: int) -> None:
    conn.execute(
        "UPDATE batches SET manifest_key = ?, manifest_at = ?, manifest_cloud_ids = ? WHERE batch_id = ?",
        [key, now, cloud_ids, batch_id],
    )


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class ManifestWriter:
    """Writes manifests off the upload path: a background task fed by `request(batch_id)`."""

    def __init__(
        self,
        catalog: Catalog,
        store: ObjectStore,
        data_dir: Path,
        metrics: Metrics,
        clock: Callable[[], float],
        retry_s: float = RETRY_S,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.tmp_dir = data_dir / "manifests.tmp"
        self.metrics = metrics
        self.clock = clock
        self.retry_s = retry_s
        self._pending: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # One write at a time: a rewrite must never be overtaken by an older one for the same batch.
        self._lock = threading.Lock()

    # -- asking for writes (non-blocking) -------------------------------------------------

    def request(self, batch_id: str) -> None:
        """Queue a (re)write of `batch_id`'s manifest; safe from any thread, never blocks.

        The forwarder calls this after recording a batch's cloud ids; requests for one batch
        made while a write is queued are coalesced into one write."""
        loop = self._loop
        if loop is None:  # not running yet (or the CLI on a stopped server): the start-up scan covers it
            self._pending.add(batch_id)
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._add(batch_id)
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: the next start-up scan writes it
            loop.call_soon_threadsafe(self._add, batch_id)

    def sealed(self, batch_id: str) -> None:
        """A batch was just sealed: count it and queue its manifest (the ingest hook)."""
        self.metrics.batches_sealed.inc()
        self.request(batch_id)

    async def sealed_many(self, batch_ids: list[str]) -> None:
        """The `BatchSealer` hook: batches sealed by time."""
        for batch_id in batch_ids:
            self.sealed(batch_id)

    def _add(self, batch_id: str) -> None:
        self._pending.add(batch_id)
        if self._wake is not None:
            self._wake.set()

    # -- writing (blocking: worker threads only) ------------------------------------------

    def current_manifest(self, batch_id: str) -> str:
        """Make sure the batch's stored manifest is current (writing it if missing or stale);
        returns its object key. Raises `NotFound` (no such batch) or `Conflict` (still collecting)."""
        with self._lock:
            try:
                return self._current(batch_id)
            except duckdb.Error as exc:  # as the catalog's own reads: a DuckDB failure is a 503, not a 500
                raise ServiceUnavailable("Catalog unavailable", str(exc)[:200]) from exc

    def _current(self, batch_id: str) -> str:
        cur = self.catalog.cursor()
        row = cur.execute(
            "SELECT state, manifest_key, manifest_cloud_ids, "
            "(SELECT count(cloud_image_id) FROM images WHERE batch_id = ?) FROM batches WHERE batch_id = ?",
            [batch_id, batch_id],
        ).fetchone()
        if row is None:
            raise NotFound("No such batch", batch_id)
        state, key, written_ids, known_ids = row
        if state == COLLECTING:
            raise Conflict("Batch is still collecting", "its manifest is written when it is sealed")
        if key is not None and written_ids == known_ids and self.store.stat(key) is not None:
            return str(key)
        return self._write(cur, batch_id)

    def _write(self, cur: Conn, batch_id: str) -> str:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{batch_id}.{uuid.uuid4().hex}.parquet"
        try:
            cur.execute(
                f"COPY ({_MANIFEST_SELECT}) TO {_sql_string(str(tmp))} (FORMAT parquet, COMPRESSION zstd)",
                [batch_id],
            )
            # Count from the file itself: exactly what this manifest holds, whatever committed since.
            counted = cur.execute(
                "SELECT count(*), count(cloud_image_id) FROM read_parquet(?)", [str(tmp)]
            ).fetchone()
            data = tmp.read_bytes()
        finally:
            tmp.unlink(missing_ok=True)
        rows, cloud_ids = (int(counted[0]), int(counted[1])) if counted else (0, 0)
        key = manifest_key(batch_id)
        # put_bytes replaces atomically on both backends (put_file would hard-link, not overwrite).
        self.store.put_bytes(key, data, CONTENT_TYPE)
        now = self.clock()
        self.catalog.write_sync(lambda c: _record(c, batch_id, key, now, cloud_ids))
        self.metrics.manifest_writes.labels("written").inc()
        log.info("manifest of %s written: %d image(s), %d cloud id(s), %d bytes",
                 batch_id, rows, cloud_ids, len(data))
        return key

    def read_bytes(self, key: str) -> bytes:
        """A stored manifest's bytes (small: about 100 bytes per image)."""
        try:
            return b"".join(self.store.iter_chunks(key))
        except KeyError:
            raise NotFound("Manifest missing from the object store", key) from None

    # -- the background task ----------------------------------------------------------------

    async def run(self) -> None:
        """Write queued manifests until cancelled; survives store and catalog errors (retried)."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # temp files of a crashed write
        next_scan = 0.0
        while True:
            now = anyio.current_time()
            if now >= next_scan:
                try:
                    self._pending.update(await self.catalog.read(stale_manifests))
                    next_scan = now + RESCAN_EVERY_S
                except Exception as exc:
                    log.warning("manifest scan failed (retrying in %.0f s): %s", self.retry_s, exc)
                    next_scan = now + self.retry_s
            self._wake.clear()
            batch_ids, self._pending = sorted(self._pending), set()
            failed = [b for b in batch_ids if not await self._write_one(b)]
            self._pending.update(failed)
            # A request that arrived during the writes has set the event: no wait then.
            wait = self.retry_s if failed else max(0.0, next_scan - anyio.current_time())
            with anyio.move_on_after(wait):
                await self._wake.wait()

    async def _write_one(self, batch_id: str) -> bool:
        """True when done (written, current already, or nothing to write); False: retry later."""
        try:
            await anyio.to_thread.run_sync(self.current_manifest, batch_id)
        except (NotFound, Conflict):
            return True
        except Exception as exc:
            self.metrics.manifest_writes.labels("failed").inc()
            log.warning("manifest of %s not written (retrying): %s", batch_id, exc)
            return False
        return True
