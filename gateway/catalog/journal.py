"""The catalog's journal: acknowledged writes that DuckDB has not taken in yet.

An upload's records, and a delivery's, go first to this append-only file, fsynced once per group,
and are acknowledged then; the catalog writer moves them into DuckDB in large batches and empties
the file once DuckDB has committed them (why: docs/design.md, "The catalog writer and its journal").

File format: a sequence of frames `length (u32 LE) | crc32 (u32 LE) | body`, the body a versioned
frame of typed records (`records.py`; a first-layout body, from before the format number, is
converted by `legacy.py`). A frame cut short or failing its CRC with no whole frame after it is a
torn tail: the write that never returned, so its upload was never acknowledged. It is cut off, and
its bytes kept aside in `<journal>.torn-<time>`. A bad frame with whole frames after it is damage,
not a torn write: those later frames were acknowledged, so `open` refuses (`JournalDamaged`) and
leaves the file as it is; so does a whole frame this code cannot read (`JournalUnreadable`: a
newer format or an unknown kind). Replaying a frame twice is harmless (the appliers insert rows
`OR IGNORE` on replay and their updates are idempotent), so a crash between DuckDB's commit and
the journal's reset loses nothing and doubles nothing.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from pathlib import Path

import msgspec

import gateway.catalog.legacy as legacy
from gateway.catalog.records import FORMAT, KINDS, Frame, JournalUnreadable, Unreadable, encode
from gateway.errors import StartRefused
from gateway.system.files import fsync_dir

_HEAD = struct.Struct("<II")
_MAX_FRAME = 64 * 1024 * 1024
_decode_frame = msgspec.msgpack.Decoder(Frame).decode
_decode_head = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
_decode_any = msgspec.msgpack.Decoder().decode
log = logging.getLogger("gateway.catalog")


class JournalDamaged(StartRefused):
    """A bad record with whole records after it: acknowledged writes would be lost by cutting."""

    def __init__(self, path: Path, offset: int, later: int) -> None:
        self.path, self.offset = path, offset
        super().__init__(
            f"catalog journal {path} is damaged at byte {offset}: a record there is unreadable and a whole "
            f"record follows at byte {later}, so this is not a torn end. The file is left as it is. Keep a "
            f"copy of it; to start anyway, move it aside (the acknowledged writes from byte {offset} on "
            f"are then not in the catalog)")


def decode(body: bytes) -> Frame:
    """A frame of any layout this code reads; raises `Unreadable` otherwise."""
    try:
        head = _decode_head(body)
    except msgspec.DecodeError as exc:
        raise Unreadable(f"not a journal record: {exc}") from exc
    first = _decode_any(head[0]) if head else None
    if isinstance(first, list):  # the first layout: [rows, statements, updates]
        return legacy.convert(body)
    if not isinstance(first, int) or isinstance(first, bool):
        raise Unreadable("not a journal record")
    if first > FORMAT:
        raise Unreadable(f"journal format {first}, written by a newer gateway; this one reads up to {FORMAT}")
    if first < FORMAT:  # no such layout was ever written
        raise Unreadable(f"unknown journal format {first}")
    try:
        return _decode_frame(body)
    except msgspec.ValidationError as exc:
        raise Unreadable(f"{_unknown_kinds(head)}: {exc}") from exc


def _unknown_kinds(head: list[msgspec.Raw]) -> str:
    """Name the record kinds this code does not know, for the refusal's message."""
    known = {k.__struct_config__.tag for k in KINDS}
    try:
        records = _decode_any(head[1]) if len(head) > 1 else []
        unknown = sorted({str(r[0]) for r in records if isinstance(r, list) and r and r[0] not in known})
    except (msgspec.DecodeError, TypeError):
        unknown = []
    return f"unknown record kind {', '.join(unknown)}" if unknown else "a record this gateway cannot read"


def frame(record: Frame) -> bytes:
    """`record` as it is appended to the file."""
    body = encode(record)
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


class Journal:
    """The journal file: appended by the catalog writer thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.size = 0

    def open(self) -> list[Frame]:
        """Open the file, returning the frames it holds (left by a crash), intact ones only."""
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if created:  # the file's own name must survive a power cut too
            fsync_dir(self.path.parent)
        chunks = []
        while chunk := os.read(self._fd, 1024 * 1024):
            chunks.append(chunk)
        data = b"".join(chunks)
        try:
            entries, good = parse(data)
        except Unreadable as exc:
            os.close(self._fd)
            self._fd = -1
            raise JournalUnreadable(self.path, exc.args[1], str(exc.args[0])) from exc
        if good != len(data):
            later = next_whole_frame(data, good)
            if later is not None:
                os.close(self._fd)
                self._fd = -1
                raise JournalDamaged(self.path, good, later)
            self._keep_torn_tail(data[good:])
            os.ftruncate(self._fd, good)  # new frames follow the last whole one
            os.fsync(self._fd)
        self.size = good
        os.lseek(self._fd, good, os.SEEK_SET)
        return entries

    def _keep_torn_tail(self, tail: bytes) -> None:
        """The bytes of a write that never returned, kept beside the journal before they are cut."""
        aside = self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, tail)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path.parent)
        log.warning("catalog journal %s: a torn tail of %d byte(s) was cut (a write that never returned); "
                    "its bytes are kept in %s", self.path, len(tail), aside)

    def append(self, frames: list[bytes]) -> None:
        """Write the frames and fsync; on failure the file is cut back to where it was."""
        data = b"".join(frames)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self.size)
                os.lseek(self._fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            raise
        self.size += len(data)

    def reset(self) -> None:
        """Every entry is in DuckDB: empty the file."""
        if self.size == 0:
            return
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def parse(data: bytes) -> tuple[list[Frame], int]:
    """The whole frames at the start of `data`, and how many bytes they take. A whole frame that
    cannot be read raises `Unreadable(why, offset)`: it is no torn write, and must not be cut."""
    entries: list[Frame] = []
    pos = 0
    while pos + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if length > _MAX_FRAME or end > len(data):
            break
        body = data[pos + _HEAD.size : end]
        if zlib.crc32(body) != crc:
            break
        try:
            _decode_head(body)
        except msgspec.DecodeError:
            break  # not even a msgpack array: garbage whose CRC matched by chance
        try:
            entries.append(decode(body))
        except Unreadable as exc:
            raise Unreadable(str(exc), pos) from exc
        pos = end
    return entries, pos


def next_whole_frame(data: bytes, start: int) -> int | None:
    """The offset of the first whole, valid frame after the bad one at `start`, if any. Every
    offset is tried, since the bad frame's own length field may be what is damaged."""
    for pos in range(start + 1, len(data) - _HEAD.size + 1):
        length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if length == 0 or length > _MAX_FRAME or end > len(data):
            continue
        body = data[pos + _HEAD.size : end]
        if zlib.crc32(body) != crc:
            continue
        try:
            _decode_head(body)
        except msgspec.DecodeError:
            continue
        return pos
    return None

