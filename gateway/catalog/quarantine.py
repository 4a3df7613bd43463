"""Journal records DuckDB refuses, set aside so that one bad record does not stop the gateway.

A journal record is an acknowledged write. If DuckDB refuses it for a reason of the record's own
(a constraint, a type, a missing table; not a full disk or an I/O error, which pass), the catalog
moves it here, `<journal>.quarantine` beside the journal, with the reason, and goes on serving.
`gateway journal quarantine list|apply|drop` settles it: apply again after a fix, or drop it;
`list` and `drop` show what it held (image ids, storage keys), so what it acknowledged stays findable.

File format: frames as in the journal (`length | crc32 | msgpack(Quarantined)`), the record's
journal frame body under `entry` as it was written (`journal.decode` reads it); appended and
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

from gateway.catalog.journal import decode
from gateway.catalog.records import (
    BatchSealed,
    Frame,
    ImageAccepted,
    ImageWithdrawn,
    OutboxDelivered,
    Unreadable,
    encode,
)
from gateway.system.files import fsync_dir

log = logging.getLogger("gateway.catalog")
_HEAD = struct.Struct("<II")
# Errors that say nothing about the record: the disk, memory, the database itself. Such a record
# waits (uploads get 503/507) rather than being set aside.
TRANSIENT = (duckdb.IOException, duckdb.OutOfMemoryException, duckdb.FatalException, duckdb.InternalException,
             duckdb.InterruptException, duckdb.ConnectionException, duckdb.TransactionException, OSError)


class Quarantined(msgspec.Struct, frozen=True):
    """A set-aside record; `entry` is its journal frame's body as written (any layout), kept byte
    for byte so that a record this code cannot read is still listed, kept or dropped, never lost."""

    id: str
    at: float
    reason: str
    entry: msgspec.Raw

    def frame(self) -> Frame:
        """The record's frame; raises `Unreadable` for a layout this code does not read."""
        return decode(bytes(self.entry))

    def same(self, frame: Frame) -> bool:
        try:
            return self.frame() == frame
        except Unreadable:
            return False


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Quarantined).decode


def record_refused(exc: BaseException) -> bool:
    """Whether DuckDB refused a record for a reason of the record's own (not the disk's or its own)."""
    return not isinstance(exc, TRANSIENT)


def held(record: Quarantined | Frame) -> dict[str, Any]:
    """What a record acknowledged, for people: its records by kind, image ids and storage keys."""
    try:
        frame = record.frame() if isinstance(record, Quarantined) else record
    except Unreadable as exc:
        return {"records": {}, "image_ids": [], "storage_keys": [], "sealed_batches": [], "unreadable": str(exc)}
    kinds: dict[str, int] = {}
    image_ids: set[str] = set()
    storage_keys: set[str] = set()
    batch_ids: set[str] = set()
    for r in frame.records:
        kind = str(type(r).__struct_config__.tag)
        kinds[kind] = kinds.get(kind, 0) + 1
        if isinstance(r, ImageAccepted | OutboxDelivered | ImageWithdrawn):
            image_ids.add(r.image_id)
        if isinstance(r, ImageAccepted):
            storage_keys.add(r.storage_key)
        if isinstance(r, BatchSealed):
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
        record = Quarantined(id=uuid.uuid4().hex[:12], at=time.time(), reason=reason[:2000],
                             entry=msgspec.Raw(encode(frame)))
        body = _encode(record)
        with self._lock:
            same = next((r for r in self.records() if r.same(frame)), None)
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
            out.append(_decode(body))
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
