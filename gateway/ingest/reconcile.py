"""Start-up (and periodic) reconciliation of the catalog with the object store.

Every upload leaves an intent file `<spool>/<uuid-hex>.part` until it is committed with its
object or known to have stored nothing. An upload's record and its PUT run side by side, so an
intent left behind (crash, kill -9, cancelled request, store error) may name a row, an object,
both or neither. Settled here: a row with its object just loses the intent; a row without its
object is withdrawn (that upload was never acknowledged); an object without its row is removed.
Until then the image is `storing`, which the forwarder leaves alone.
A recent sample of catalog rows is also checked for missing objects, which are reported.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from pathlib import Path

import anyio
import msgspec

from gateway.catalog import Catalog
from gateway.errors import GatewayError
from gateway.ingest.storing import StoringImages
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.reconcile")
RECONCILE_EVERY_S = 600.0
RECONCILE_RETRY_S = 5.0
# After a crash, how long a PUT the dead process had sent may take to land in the store.
INTENT_QUIET_S = 20.0
STALE_INTENT_S = 600.0


class ReconcileReport(msgspec.Struct, kw_only=True):
    intents: int = 0
    committed: int = 0
    # Rows whose objects never got stored (in the report of start-up: also those settled since).
    withdrawn: list[str] = msgspec.field(default_factory=list)
    deferred: int = 0  # could not be settled now (store unreachable); tried again later
    strays_removed: list[str] = msgspec.field(default_factory=list)
    missing_objects: list[str] = msgspec.field(default_factory=list)
    sealed: list[str] = msgspec.field(default_factory=list)  # batches that waited for a settled row

    @property
    def clean(self) -> bool:
        return (not self.strays_removed and not self.missing_objects and not self.withdrawn
                and self.intents == 0 and self.deferred == 0)


def settle_intents(
    catalog: Catalog,
    store: ObjectStore,
    spool_dir: os.PathLike[str] | str,
    *,
    skip: Collection[str] = (),
    min_age_s: float = 0.0,
    before: float | None = None,
    quiet_until: float = 0.0,
    report: ReconcileReport | None = None,
    storing: StoringImages | None = None,
) -> ReconcileReport:
    """Settle leftover upload intents (blocking; run in a worker thread).

    An intent is settled when it is at least `min_age_s` old, or older than `before` (intents a
    previous process left are settled whatever their age). One that cannot be settled now (the
    store does not answer) is kept and counted as deferred. Until `quiet_until`, an uncommitted
    intent whose object is not (yet) in the store is kept too: a PUT the dead process had fully
    sent may still be landing, and its object must not outlive the intent that can find it.
    An intent settled leaves `storing`."""
    report = report or ReconcileReport()
    now = time.time()
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return report
    for entry in entries:
        if not entry.name.endswith(".part"):
            continue
        uid = entry.name[: -len(".part")]
        if uid in skip:
            continue
        try:
            mtime = entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if now - mtime < min_age_s and (before is None or mtime >= before):
            continue
        try:
            settled = _settle_one(catalog, store, uid, report, keep_if_absent=now < quiet_until, now=now)
        except GatewayError as exc:
            report.deferred += 1
            log.warning("upload intent %s not settled yet: %s", uid, exc)
            continue
        if not settled:
            report.deferred += 1
            continue
        report.intents += 1
        os.unlink(entry.path)
        if storing is not None:
            image_id = image_id_of(uid)
            storing.discard(image_id, withdrawn=image_id in report.withdrawn)
    return report


def image_id_of(uid: str) -> str:
    """The image id an upload intent `<uid>.part` records under."""
    return f"img_{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:]}"


def intent_uids(spool_dir: os.PathLike[str] | str) -> list[str]:
    """The uids of the upload intents `<uid>.part` in `spool_dir`: uploads in progress, or left
    to reconcile."""
    try:
        return [e.name[: -len(".part")] for e in os.scandir(spool_dir) if e.name.endswith(".part")]
    except FileNotFoundError:
        return []


def leftover_image_ids(spool_dir: os.PathLike[str] | str) -> list[str]:
    """The image ids of the upload intents in `spool_dir`."""
    return [image_id_of(uid) for uid in intent_uids(spool_dir)]


def _settle_one(catalog: Catalog, store: ObjectStore, uid: str, report: ReconcileReport,
                keep_if_absent: bool, now: float) -> bool:
    """Settle one intent; False when it must be kept for a later pass."""
    image_id = image_id_of(uid)
    row = catalog.read_sync(lambda c: c.execute(
        "SELECT storage_key, device_id, batch_id, size FROM images WHERE image_id = ?", [image_id]).fetchone())
    if row is not None:
        storage_key, device_id, batch_id, size = row
        found = store.stat(storage_key)
        if found is not None and found.size == size:  # recorded and stored: perhaps acknowledged, kept
            _note_sealed(report, catalog.submit_stored(image_id, now).result())  # a batch may wait for it
            report.committed += 1
            return True
        if found is None and keep_if_absent:
            return False
        # Never stored whole, so never acknowledged (an object of another size is a PUT cut short).
        _note_sealed(report, catalog.submit_withdrawn(image_id, device_id, batch_id, int(size), now).result())
        report.withdrawn.append(image_id)
        log.warning("withdrew upload %s: recorded, but its object never reached the store whole (never "
                    "acknowledged)", image_id)
    strays = list(store.list(f"raw-data/{uid}_"))
    for obj in strays:
        store.delete(obj.key)
        report.strays_removed.append(obj.key)
        log.warning("removed stray object %s (upload never committed)", obj.key)
    return row is not None or bool(strays) or not keep_if_absent


def _note_sealed(report: ReconcileReport, batch_id: str | None) -> None:
    if batch_id is not None:
        report.sealed.append(batch_id)


def check_recent_objects(catalog: Catalog, store: ObjectStore, sample: int = 50, report: ReconcileReport | None = None,
                         storing: StoringImages | None = None) -> ReconcileReport:
    """Report catalog rows among the most recent `sample` whose object is missing (but those
    still `storing`)."""
    report = report or ReconcileReport()
    rows = catalog.read_sync(lambda c: c.execute(
        "SELECT storage_key, image_id FROM images WHERE bytes_removed_at IS NULL ORDER BY seq DESC LIMIT ?",
        [sample]).fetchall())
    for key, image_id in rows:
        if storing is not None and image_id in storing:
            continue
        if store.stat(key) is None:
            report.missing_objects.append(key)
            log.error("catalog row without its object: %s", key)
    return report


class Reconciler:
    """Settles leftover upload intents at start, then now and then; keeps the figures for the status report.

    Intents a previous process left are retried soon while any remain unsettled (the store was down
    at start-up); this process's own are settled once clearly abandoned."""

    def __init__(self, catalog: Catalog, store: ObjectStore, spool_dir: Path, active: Callable[[], Collection[str]],
                 started_at: float, storing: StoringImages | None = None,
                 on_sealed: Callable[[str], None] | None = None) -> None:
        """`active`: spool names of uploads in progress, which must be left alone; `storing`: the
        images whose objects are not known to be stored, shared with the ingestor and forwarder;
        `on_sealed`: told (on the event loop) of each batch a settled row let the writer seal."""
        self.catalog = catalog
        self.on_sealed = on_sealed
        self.storing = storing if storing is not None else StoringImages()
        self.store = store
        self.spool_dir = spool_dir
        self.active = active
        self.started_at = started_at
        self.startup = ReconcileReport()  # what the start-up pass found
        self.unsettled = 0  # leftover intents still to settle

    def at_start(self, report: ReconcileReport | None = None) -> ReconcileReport:
        """The start-up pass (blocking; a worker thread): leftover intents, then recent objects,
        into `report`. (`Ingestor.start` has made their images `storing` already.)"""
        report = report if report is not None else ReconcileReport()
        settle_intents(self.catalog, self.store, self.spool_dir, quiet_until=self.started_at + INTENT_QUIET_S,
                       report=report, storing=self.storing)
        check_recent_objects(self.catalog, self.store, report=report, storing=self.storing)
        if report.intents:
            log.info("start-up reconciliation: %d leftover upload(s), %d committed, %d withdrawn (never stored), "
                     "%d stray object(s) removed", report.intents, report.committed, len(report.withdrawn),
                     len(report.strays_removed))
        self.startup = report
        self.unsettled = report.deferred
        return report

    async def settle_at_start(self) -> ReconcileReport:
        """`at_start` in a worker thread; the batches it sealed are announced from the event loop,
        also when the pass fails part-way (the store going away, say)."""
        report = ReconcileReport()
        try:
            return await anyio.to_thread.run_sync(self.at_start, report)
        finally:
            self._announce(report)

    def _announce(self, report: ReconcileReport) -> None:
        if self.on_sealed is None:
            return
        for batch_id in report.sealed:
            try:
                self.on_sealed(batch_id)
            except Exception:  # a manifest or a wake-up missed is caught up by their periodic scans
                log.exception("could not announce batch %s, sealed by the reconciliation", batch_id)

    def store_down_at_start(self) -> None:
        """The store did not answer at start: every leftover intent waits for the periodic pass."""
        self.startup = ReconcileReport(deferred=len(intent_uids(self.spool_dir)))
        self.unsettled = self.startup.deferred

    async def run(self) -> None:
        """Background task: the periodic pass, sooner while intents remain unsettled."""
        while True:
            await anyio.sleep(RECONCILE_RETRY_S if self.unsettled else RECONCILE_EVERY_S)
            await self.settle_later()

    async def settle_later(self) -> None:
        """One periodic pass: intents an earlier process left (deferred at start) and this
        process's own that were clearly abandoned."""
        report = ReconcileReport()
        try:
            await anyio.to_thread.run_sync(lambda: settle_intents(
                self.catalog, self.store, self.spool_dir, skip=self.active(), min_age_s=STALE_INTENT_S,
                before=self.started_at, quiet_until=self.started_at + INTENT_QUIET_S, report=report,
                storing=self.storing))
        except Exception as exc:
            log.warning("periodic reconciliation failed: %s", exc)
            self.unsettled = max(1, self.unsettled)
        else:
            self.unsettled = report.deferred
        finally:  # what the pass settled before any failure counts
            self.startup.withdrawn.extend(report.withdrawn)
            self._announce(report)
