"""Journal records DuckDB refuses, set aside so that one bad record does not stop the gateway.

A journal record is an acknowledged write. If DuckDB refuses it for a reason of the record's own
(a constraint, a type, a missing table; not a full disk or an I/O error, which pass), the catalog
moves it here, `<journal>.quarantine` beside the journal, with the reason, and goes on serving.
`gateway journal quarantine list|apply|drop` settles it: apply again after a fix, or drop it;
`list` and `drop` show what it held (image ids, storage keys), so what it acknowledged stays findable.

File format: frames as in the journal (`length | crc32 | msgpack(Quarantined)`), the record's
journal frame under `entry` in any layout the journal reads (`journal.decode`); appended and
fsynced before the journal that held the record is emptied; rewritten whole (temp file, rename)
when records leave.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import duckdb
import msgspec

from gateway.catalog.journal import decode, fsync_dir
from gateway.catalog.records import BatchOpened, Frame, ImageAccepted, OutboxDelivered, Unreadable
from gateway.errors import StartRefused

log = logging.getLogger("gateway.catalog")
_HEAD = struct.Struct("<II")
# Errors that say nothing about the record: the disk, memory, the database itself. Such a record
# waits (uploads get 503/507) rather than being set aside.
TRANSIENT = (duckdb.IOException, duckdb.OutOfMemoryException, duckdb.FatalException, duckdb.InternalException,
             duckdb.InterruptException, duckdb.ConnectionException, duckdb.TransactionException, OSError)


class Quarantined(msgspec.Struct, frozen=True):
    id: str
    at: float
    reason: str
    frame: Frame = msgspec.field(name="entry")


class _Stored(msgspec.Struct, frozen=True):
    """A quarantined record as read, its frame not yet decoded (it may be of an older layout)."""

    id: str
    at: float
    reason: str
    entry: msgspec.Raw


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Stored).decode


class QuarantineUnreadable(StartRefused):
    """A whole quarantined record this code cannot read (a newer gateway's): refused, not dropped."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"journal quarantine {path} holds a record this gateway cannot read ({why}). The file "
                         f"is left as it is; start the gateway version that wrote it, or keep a copy and move it aside")


def record_refused(exc: BaseException) -> bool:
    """Whether DuckDB refused a record for a reason of the record's own (not the disk's or its own)."""
    return not isinstance(exc, TRANSIENT)


def held(frame: Frame) -> dict[str, Any]:
    """What a record acknowledged, for people: its records by kind, image ids and storage keys."""
    kinds: dict[str, int] = {}
    image_ids: set[str] = set()
    storage_keys: set[str] = set()
    batch_ids: set[str] = set()
    for r in frame.records:
        kind = str(type(r).__struct_config__.tag)
        kinds[kind] = kinds.get(kind, 0) + 1
        if isinstance(r, ImageAccepted | OutboxDelivered):
            image_ids.add(r.image_id)
        if isinstance(r, ImageAccepted):
            storage_keys.add(r.storage_key)
        if not isinstance(r, ImageAccepted | OutboxDelivered | BatchOpened):
            batch_ids.add(r.batch_id)
    return {"records": kinds, "image_ids": sorted(image_ids), "storage_keys": sorted(storage_keys),
            "sealed_batches": sorted(batch_ids)}


class JournalQuarantine:
    """The quarantine file beside the catalog journal."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.count = 0

    def load(self) -> None:
        """Count what an earlier run set aside (at the catalog's open)."""
        self.count = len(self.records())

    def add(self, frame: Frame, reason: str) -> Quarantined:
        """Set `frame` aside durably (fsynced) before the journal holding it is emptied."""
        record = Quarantined(id=uuid.uuid4().hex[:12], at=time.time(), reason=reason[:2000], frame=frame)
        body = _encode(record)
        with self._lock:
            same = next((r for r in self.records() if r.frame == frame), None)
            if same is not None:  # set aside before a crash, and refused again by the replay
                return same
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, _HEAD.pack(len(body), zlib.crc32(body)) + body)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
            self.count += 1
        log.error("catalog journal: a record DuckDB refuses was quarantined as %s in %s (%s); it held %s",
                  record.id, self.path, reason[:300], held(frame))
        return record

    def records(self) -> list[Quarantined]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out, pos = [], 0
        while pos + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, pos)
            body = data[pos + _HEAD.size : pos + _HEAD.size + length]
            if len(body) != length or zlib.crc32(body) != crc:
                log.warning("journal quarantine %s: unreadable from byte %d on", self.path, pos)
                break
            stored = _decode(body)
            try:
                frame = decode(stored.entry)
            except Unreadable as exc:
                raise QuarantineUnreadable(self.path, str(exc)) from exc
            out.append(Quarantined(id=stored.id, at=stored.at, reason=stored.reason, frame=frame))
            pos += _HEAD.size + length
        return out

    def remove(self, ids: set[str]) -> list[Quarantined]:
        """Take the records `ids` out of the file (rewritten whole); returns them."""
        with self._lock:
            records = self.records()
            gone = [r for r in records if r.id in ids]
            if not gone:
                return []
            kept = [r for r in records if r.id not in ids]
            tmp = self.path.with_name(self.path.name + ".new")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for r in kept:
                    body = _encode(r)
                    os.write(fd, _HEAD.pack(len(body), zlib.crc32(body)) + body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            self.count = len(kept)
            return gone
