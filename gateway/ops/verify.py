"""`gateway verify`: the catalog checked against the object store, both ways.

- rows whose object is missing (images whose bytes were removed on purpose, `bytes_removed_at`
  set, are not expected in the store);
- stray objects under `raw-data/` that no row names: an upload between its PUT and its commit
  looks like one, so only strays older than `storage.orphan_grace_s` and with no upload intent
  left in the spool are removed by `--repair`;
- sizes of every row against the listing, and XXH3-128 of a random sample of rows (all with
  `full`), read back from the store.

Repairs, all safe: old strays removed; a delivered image whose object is gone (an eviction cut
short) gets `bytes_removed_at`; an object left behind by an eviction cut short is removed.
Missing undelivered bytes and hash mismatches cannot be repaired here and are only reported.
Blocking: run it in a worker thread.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from functools import partial
from pathlib import Path

import msgspec
import xxhash

from gateway.catalog import Catalog, Conn
from gateway.forward.bytes_lifecycle import mark_removed
from gateway.ingest.reconcile import intent_uids
from gateway.storage import ObjectStore
from gateway.storage.base import ObjectInfo

log = logging.getLogger("gateway.ops.verify")
IMAGE_PREFIX = "raw-data/"


class VerifyProgress(msgspec.Struct, kw_only=True):
    """Where a run is; read by the admin API while the run goes on (CLI progress bar)."""

    running: bool = False
    phase: str = ""
    done: int = 0
    total: int = 0
    started_at: float = 0.0


class Finding(msgspec.Struct, kw_only=True):
    kind: str  # missing | stray | size_mismatch | hash_mismatch | evicted_leftover | missing_delivered
    key: str
    image_id: str | None = None
    detail: str = ""
    repaired: bool = False


class VerifyReport(msgspec.Struct, kw_only=True):
    full: bool
    repair: bool
    rows: int = 0
    objects: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    strays_in_grace: int = 0
    rows_storing: int = 0  # rows whose objects were still on their way (their uploads in progress)
    findings: list[Finding] = msgspec.field(default_factory=list)
    duration_s: float = 0.0

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    @property
    def unrepaired(self) -> int:
        return sum(1 for f in self.findings if not f.repaired)

    def summary(self) -> dict[str, int]:
        kinds = ("missing", "missing_delivered", "stray", "evicted_leftover", "size_mismatch", "hash_mismatch")
        out = {k: self.count(k) for k in kinds}
        out["repaired"] = sum(1 for f in self.findings if f.repaired)
        out["unrepaired"] = self.unrepaired
        return out


class _Row(msgspec.Struct, array_like=True):
    image_id: str
    storage_key: str
    size: int
    xxh3_128: str
    removed: bool
    delivered: bool


def _rows(conn: Conn) -> list[_Row]:
    result = conn.execute(
        "SELECT i.image_id, i.storage_key, i.size, i.xxh3_128, i.bytes_removed_at IS NOT NULL, "
        "coalesce(o.state = 'delivered', false) FROM images i LEFT JOIN outbox o ON o.image_id = i.image_id"
    ).fetchall()
    return [_Row(r[0], r[1], int(r[2]), r[3], bool(r[4]), bool(r[5])) for r in result]


def _row_exists(conn: Conn, key: str) -> bool:
    return conn.execute("SELECT 1 FROM images WHERE storage_key = ? LIMIT 1", [key]).fetchone() is not None


def _uid(storage_key: str) -> str:
    """The upload uid in an image's storage key (`raw-data/<uid>_<filename>`)."""
    return storage_key[len(IMAGE_PREFIX):].split("_", 1)[0]


class Verifier:
    """One verification run over a catalog and a store."""

    def __init__(self, catalog: Catalog, store: ObjectStore, spool_dir: Path, orphan_grace_s: float,
                 progress: VerifyProgress | None = None, now: float | None = None) -> None:
        self.catalog = catalog
        self.store = store
        self.spool_dir = spool_dir
        self.grace_s = orphan_grace_s
        self.progress = progress or VerifyProgress()
        self.now = now if now is not None else time.time()
        self.cancelled = threading.Event()

    def _phase(self, name: str, total: int) -> None:
        self.progress.phase, self.progress.done, self.progress.total = name, 0, total

    def run(self, *, full: bool = False, sample: int = 100, repair: bool = False) -> VerifyReport:
        started = time.monotonic()
        report = VerifyReport(full=full, repair=repair)
        self._phase("listing objects", 0)
        # List first, read rows second: a row committed in between is then seen, so a fresh
        # upload is never taken for a stray (its object may still look missing: re-checked below).
        listed: dict[str, ObjectInfo] = {}
        for obj in self.store.list(IMAGE_PREFIX):
            listed[obj.key] = obj
            self.progress.done += 1
        rows = self.catalog.read_sync(_rows)
        report.rows, report.objects = len(rows), len(listed)
        by_key = {r.storage_key: r for r in rows}
        # Read after the rows: an upload recorded while its object is on its way still has its intent.
        intents = set(intent_uids(self.spool_dir))

        self._phase("checking rows", len(rows))
        to_mark: list[Finding] = []
        for row in rows:
            self.progress.done += 1
            info = listed.get(row.storage_key)
            if row.removed:
                if info is not None:
                    report.findings.append(Finding(kind="evicted_leftover", key=row.storage_key,
                                                   image_id=row.image_id, detail="bytes_removed_at set"))
                continue
            if info is None and _uid(row.storage_key) in intents:  # being stored (or settled at the next pass)
                report.rows_storing += 1
                continue
            if info is None and self.store.stat(row.storage_key) is None:
                kind = "missing_delivered" if row.delivered else "missing"
                finding = Finding(kind=kind, key=row.storage_key, image_id=row.image_id,
                                  detail="delivered to the cloud; local bytes gone" if row.delivered
                                  else "NOT delivered: these bytes are lost locally")
                report.findings.append(finding)
                if row.delivered:
                    to_mark.append(finding)
            elif info is not None and info.size != row.size:
                report.findings.append(Finding(kind="size_mismatch", key=row.storage_key, image_id=row.image_id,
                                               detail=f"catalog {row.size} bytes, store {info.size}"))

        strays = [info for key, info in listed.items() if key not in by_key]
        self._phase("checking strays", len(strays))
        for info in strays:
            self.progress.done += 1
            age = self.now - info.modified
            if age < self.grace_s or _uid(info.key) in intents:
                report.strays_in_grace += 1
                continue
            report.findings.append(Finding(kind="stray", key=info.key, detail=f"{info.size} bytes, {age:.0f} s old"))

        candidates = [r for r in rows if not r.removed and r.storage_key in listed]
        if not full and len(candidates) > sample:
            candidates = random.sample(candidates, sample)
        self._phase("hashing", len(candidates))
        for row in candidates:
            if self.cancelled.is_set():
                break
            digest, size = self._hash(row.storage_key)
            report.hashed += 1
            report.hashed_bytes += size
            self.progress.done += 1
            if digest is not None and digest != row.xxh3_128:
                report.findings.append(Finding(kind="hash_mismatch", key=row.storage_key, image_id=row.image_id,
                                               detail=f"catalog {row.xxh3_128}, store {digest}"))

        if repair:
            self._phase("repairing", len(report.findings))
            self._repair(report, to_mark)
        report.duration_s = round(time.monotonic() - started, 3)
        return report

    def _hash(self, key: str) -> tuple[str | None, int]:
        h = xxhash.xxh3_128()
        size = 0
        try:
            for chunk in self.store.iter_chunks(key):
                h.update(chunk)
                size += len(chunk)
        except KeyError:  # removed since the listing
            return None, 0
        return h.hexdigest(), size

    def _repair(self, report: VerifyReport, to_mark: list[Finding]) -> None:
        for finding in report.findings:
            self.progress.done += 1
            if finding.kind == "stray":
                # Last look: a row may have been committed for it since the listing.
                if self.catalog.read_sync(partial(_row_exists, key=finding.key)):
                    finding.detail += "; now has a row, kept"
                    finding.repaired = True
                    continue
                self.store.delete(finding.key)
                finding.repaired = True
                log.warning("verify: removed stray object %s", finding.key)
            elif finding.kind == "evicted_leftover":
                self.store.delete(finding.key)
                finding.repaired = True
        if to_mark:
            ids = [f.image_id for f in to_mark if f.image_id]
            self.catalog.write_sync(lambda c: mark_removed(c, ids, self.now))
            for f in to_mark:
                f.repaired = True
                f.detail += "; marked bytes_removed_at"
