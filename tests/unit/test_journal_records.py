"""Typed, versioned journal records: each kind round-trips; a first-layout frame (SQL text) is
converted; a frame this code cannot read (a newer format, an unknown kind) stops the open with a
clear message instead of being cut off as a torn tail."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.catalog.journal import Journal, decode, frame, parse
from gateway.catalog.records import (
    FORMAT,
    KINDS,
    BatchOpened,
    BatchSealed,
    ImageAccepted,
    ImageWithdrawn,
    JournalUnreadable,
    OutboxDelivered,
    Record,
    Unreadable,
    write,
)
from gateway.errors import StartRefused

IMAGE = ImageAccepted(image_id="img_1", seq=7, batch_id="batch_1", device_id="dev_a", filename="a.jpg",
                      content_type="image/jpeg", size=123, xxh3_128="ab" * 16, storage_key="raw-data/x_a.jpg",
                      metadata=b'{"k": "\xc3\xa9"}', received_at=1.5, fingerprint=2**64 - 1, near_duplicate_of="img_0",
                      outbox_state="skipped")
EXAMPLES: list[Record] = [
    BatchOpened(batch_id="batch_1", device_id="dev_a", opened_at=1.25),
    IMAGE,
    BatchSealed(batch_id="batch_1", sealed_at=2.5, image_count=3, total_bytes=2**40),
    OutboxDelivered(image_id="img_1", at=3.0, status=None, cloud_image_id="c", cloud_batch_id=None,
                    cloud_storage_key="k"),
    ImageWithdrawn(image_id="img_1", batch_id="batch_1"),
]


def _raw(body: bytes) -> bytes:
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


def test_every_kind_round_trips_through_the_file(tmp_path: Path) -> None:
    assert {type(r) for r in EXAMPLES} == set(KINDS)
    j = Journal(tmp_path / "j")
    j.open()
    j.append([frame(write([r])) for r in EXAMPLES] + [frame(write(EXAMPLES)), frame(write([]))])
    j.close()
    frames = Journal(tmp_path / "j").open()
    assert frames == [write([r]) for r in EXAMPLES] + [write(EXAMPLES), write([])]
    assert all(f.version == FORMAT for f in frames)


def test_a_frame_is_its_format_number_and_tagged_records() -> None:
    body = msgspec.msgpack.encode(write([EXAMPLES[0]]))
    assert msgspec.msgpack.decode(body) == [FORMAT, [["batch_opened", "batch_1", "dev_a", 1.25]]]


@pytest.mark.parametrize("last", [True, False])
def test_a_newer_format_stops_the_open_and_keeps_the_file(tmp_path: Path, last: bool) -> None:
    path = tmp_path / "j"
    newer = _raw(msgspec.msgpack.encode([FORMAT + 1, [["image_deleted", "img_1"]]]))
    good = frame(write([EXAMPLES[0]]))
    data = good + newer + (b"" if last else good)
    path.write_bytes(data)
    with pytest.raises(JournalUnreadable) as info:
        Journal(path).open()
    assert isinstance(info.value, StartRefused) and info.value.offset == len(good)
    message = str(info.value)
    assert str(path) in message and f"byte {len(good)}" in message
    assert f"journal format {FORMAT + 1}, written by a newer gateway" in message
    assert path.read_bytes() == data and list(tmp_path.iterdir()) == [path]  # not cut as a torn tail


def test_an_unknown_kind_stops_the_open_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "j"
    data = frame(write([EXAMPLES[0]])) + _raw(msgspec.msgpack.encode([FORMAT, [["image_deleted", "img_1"]]]))
    path.write_bytes(data)
    with pytest.raises(JournalUnreadable, match="unknown record kind image_deleted"):
        Journal(path).open()
    assert path.read_bytes() == data


def test_a_known_kind_with_wrong_fields_is_refused_too() -> None:
    body = msgspec.msgpack.encode([FORMAT, [["batch_opened", "batch_1"]]])
    with pytest.raises(Unreadable) as info:
        parse(_raw(body))
    assert info.value.args[1] == 0


# The first layout, as gateway/catalog/journal.py wrote it up to commit 52a8583 (a frozen copy).
class OldRows(msgspec.Struct, array_like=True, frozen=True):
    table: str
    columns: tuple[str, ...]
    values: list[tuple[Any, ...]]


class OldUpdate(msgspec.Struct, array_like=True, frozen=True):
    sql: str
    row: str
    params: list[Any]


class OldEntry(msgspec.Struct, array_like=True, frozen=True):
    rows: list[OldRows]
    statements: list[tuple[str, list[Any]]] = []
    updates: list[OldUpdate] = []


OLD_SEAL = ("UPDATE batches SET state = 'sealed', sealed_at = ?, image_count = ?, total_bytes = ? "
            "WHERE batch_id = ? AND state = 'collecting'")
OLD_DELIVERED = ("UPDATE outbox SET state = 'delivered', delivered_at = v.done_at, last_status = v.status, "
                 "attempts = outbox.attempts + 1 FROM (VALUES {rows}) v(id, done_at, status) "
                 "WHERE outbox.image_id = v.id AND outbox.state = 'pending'")
OLD_CLOUD_IDS = ("UPDATE images SET cloud_image_id = coalesce(v.image_key, images.cloud_image_id), "
                 "cloud_batch_id = coalesce(v.batch_key, images.cloud_batch_id), "
                 "cloud_storage_key = coalesce(v.storage_key, images.cloud_storage_key) "
                 "FROM (VALUES {rows}) v(id, image_key, batch_key, storage_key) WHERE images.image_id = v.id")
OLD_IMAGE_COLUMNS = ("image_id", "seq", "batch_id", "device_id", "filename", "content_type", "size", "xxh3_128",
                     "storage_key", "metadata", "received_at", "fingerprint", "near_duplicate_of")
OLD_OUTBOX_COLUMNS = ("image_id", "seq", "device_id", "size", "state", "created_at", "next_attempt_at")


def old_frame(entry: OldEntry) -> bytes:
    return _raw(msgspec.msgpack.encode(entry))


def old_upload(i: Any = IMAGE, opened: bool = True, sealed: bool = True,
               columns: tuple[str, ...] = OLD_IMAGE_COLUMNS) -> OldEntry:
    """An upload's entry as Ingestor.prepare made it (batch row, image row, outbox row, seal)."""
    fields = msgspec.structs.asdict(i)
    rows = [OldRows("batches", ("batch_id", "device_id", "state", "opened_at"),
                    [(i.batch_id, i.device_id, "collecting", 1.25)])] if opened else []
    rows.append(OldRows("images", columns, [tuple(fields[c] for c in columns)]))
    rows.append(OldRows("outbox", OLD_OUTBOX_COLUMNS,
                        [(i.image_id, i.seq, i.device_id, i.size, i.outbox_state, i.received_at, i.received_at)]))
    return OldEntry(rows=rows, statements=[(OLD_SEAL, [2.5, 3, 2**40, i.batch_id])] if sealed else [])


def old_delivery(d: OutboxDelivered) -> OldEntry:
    updates = [OldUpdate(OLD_DELIVERED, "(?, ?::DOUBLE, ?::INTEGER)", [d.image_id, d.at, d.status])]
    if d.cloud_image_id or d.cloud_batch_id or d.cloud_storage_key:
        updates.append(OldUpdate(OLD_CLOUD_IDS, "(?, ?::VARCHAR, ?::VARCHAR, ?::VARCHAR)",
                                 [d.image_id, d.cloud_image_id, d.cloud_batch_id, d.cloud_storage_key]))
    return OldEntry(rows=[], updates=updates)


def test_first_layout_frames_are_converted_into_typed_records(tmp_path: Path) -> None:
    path = tmp_path / "j"
    delivered = EXAMPLES[3]
    assert isinstance(delivered, OutboxDelivered)
    plain = OutboxDelivered(image_id="img_2", at=4.0, status=409)
    path.write_bytes(old_frame(old_upload()) + old_frame(old_delivery(delivered)) + old_frame(old_delivery(plain))
                     + old_frame(OldEntry(rows=[])))  # a readiness probe's empty entry
    assert Journal(path).open() == [write(EXAMPLES[:3]), write([delivered]), write([plain]), write([])]


def test_a_first_layout_image_row_from_before_a_migration_gets_the_new_fields_empty() -> None:
    columns = OLD_IMAGE_COLUMNS[:-2]  # before migration 5 (fingerprint, near_duplicate_of)
    body = msgspec.msgpack.encode(old_upload(opened=False, sealed=False, columns=columns))
    assert decode(body) == write([msgspec.structs.replace(IMAGE, fingerprint=None, near_duplicate_of=None)])


@pytest.mark.parametrize("entry, why", [
    (OldEntry(rows=[OldRows("notes", ("v",), [("x",)])]), "first-layout row of table 'notes'"),
    (OldEntry(rows=[], statements=[("DELETE FROM images", [])]), "statement this gateway does not know"),
    (OldEntry(rows=[], updates=[OldUpdate("UPDATE x SET y = 1 {rows}", "(?)", [1])]), "update this gateway"),
    (OldEntry(rows=[OldRows("images", OLD_IMAGE_COLUMNS, [tuple(msgspec.structs.asdict(IMAGE)[c]
                                                                for c in OLD_IMAGE_COLUMNS)])]), "without its outbox"),
])
def test_a_first_layout_write_this_code_does_not_know_stops_the_open(tmp_path: Path, entry: OldEntry,
                                                                      why: str) -> None:
    path = tmp_path / "j"
    path.write_bytes(old_frame(entry))
    with pytest.raises(JournalUnreadable, match=why):
        Journal(path).open()
    assert path.read_bytes() == old_frame(entry)
