"""Issue 23, item 12: a journal record DuckDB refuses is set aside; the catalog keeps serving.

Before: moving the journal into DuckDB failed as a whole, and from then on every read and write
(readiness included) was refused until a restart, whose replay refused the same record again.
"""

from __future__ import annotations

import struct
import zlib
from contextlib import closing
from pathlib import Path

import anyio
import duckdb
import msgspec
import pytest

from gateway.catalog import Catalog
from gateway.catalog.journal import frame
from gateway.catalog.quarantine import held
from gateway.catalog.records import BatchOpened, ImageAccepted, Record, write
from tests.integration.test_catalog_journal import SLOW, _notes, _open, note
from tests.unit.test_journal_records import OldEntry, OldRows

pytestmark = pytest.mark.integration


def refused(image_id: str = "img_1") -> list[Record]:
    """An upload DuckDB refuses for a reason of its own: a fingerprint out of UBIGINT's range."""
    return [BatchOpened(batch_id="batch_q", device_id="dev_q", opened_at=1.0),
            ImageAccepted(image_id=image_id, seq=1, batch_id="batch_q", device_id="dev_q", filename="a.jpg",
                          content_type="image/jpeg", size=10, xxh3_128="0" * 32, storage_key="raw-data/x_a.jpg",
                          metadata=None, received_at=1.0, fingerprint=-1, near_duplicate_of=None,
                          outbox_state="pending")]


def test_a_refused_record_is_set_aside_and_the_others_applied(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        items = [note("a"), note("b"), refused(), note("c")]
        for f in [cat.submit_records(e) for e in items]:
            f.result(timeout=10)
        assert _notes(cat) == ["a", "b", "c"]  # the read moved the journal in; no 503
        assert cat.pending_entries == 0 and cat.journal.size == 0
        (record,) = cat.quarantine.records()
        assert record.frame() == write(refused()) and "Conversion" in record.reason
        assert cat.quarantine.count == 1
        assert cat.quarantine.path == tmp_path / "c.duckdb.journal.quarantine"
        cat.submit_records(note("d")).result(timeout=10)  # still taking writes
        assert _notes(cat) == ["a", "b", "c", "d"]


def test_the_replay_sets_aside_what_duckdb_refuses_and_opens(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    with closing(_open(path)):
        pass
    journal = tmp_path / "c.duckdb.journal"
    journal.write_bytes(frame(write(note("a"))) + frame(write(refused())) + frame(write(note("b"))))
    cat = Catalog(path)
    cat.open()
    with closing(cat):
        assert _notes(cat) == ["a", "b"] and cat.replayed == 3
        (record,) = cat.quarantine.records()
        assert held(record) == {"records": {"batch_opened": 1, "image_accepted": 1}, "image_ids": ["img_1"],
                                      "storage_keys": ["raw-data/x_a.jpg"], "sealed_batches": []}
    again = Catalog(path)  # a restart does not quarantine it twice
    again.open()
    with closing(again):
        assert again.quarantine.count == 1


def test_apply_after_a_fix_then_drop(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        cat.submit_records(refused("img_late")).result(timeout=10)
        cat.submit_records(refused("img_never")).result(timeout=10)
        assert _notes(cat) == []
        first, second = cat.quarantine.records()
        applied, refused_now = anyio.run(cat.apply_quarantined, None)
        assert applied == [] and set(refused_now) == {first.id, second.id}  # nothing fixed yet: both stay

        def fix(c: duckdb.DuckDBPyConnection) -> None:  # an admin widens the column by hand
            c.execute("DROP INDEX images_by_hash")
            c.execute("ALTER TABLE images ALTER fingerprint TYPE BIGINT")

        cat.write_sync(fix)
        applied, refused_now = anyio.run(cat.apply_quarantined, {first.id})
        assert [r.id for r in applied] == [first.id] and refused_now == {}
        assert cat.read_sync(lambda c: c.execute("SELECT image_id, fingerprint FROM images").fetchall()) == [
            ("img_late", -1)]
        assert [r.id for r in cat.quarantine.remove({second.id})] == [second.id]
        assert cat.quarantine.records() == [] and cat.quarantine.count == 0




def test_a_quarantine_file_of_the_first_layout_is_read_and_what_it_cannot_read_is_kept(tmp_path: Path) -> None:
    """Records set aside by a gateway of the first layout (SQL text): converted where they are
    writes it knows; any other is listed as unreadable, kept byte for byte, and may be dropped."""
    path = tmp_path / "c.duckdb"
    with closing(_open(path)):
        pass
    known = OldEntry(rows=[OldRows("batches", ("batch_id", "device_id", "state", "opened_at"),
                                   [("batch_old", "dev_notes", "collecting", 1.0)])])
    unknown = OldEntry(rows=[OldRows("images", ("image_id", "storage_key", "filename"),
                                     [("img_q1", "raw-data/abc_q.jpg", None)])])
    old = [{"id": f"old{i}", "at": 1.0, "reason": "ConstraintException: NOT NULL", "entry": e}
           for i, e in enumerate((known, unknown))]
    qfile = tmp_path / "c.duckdb.journal.quarantine"
    qfile.write_bytes(b"".join(old_frame(msgspec.msgpack.encode(r)) for r in old))
    with closing(_open(path)) as cat:  # opens: quarantined records never stop the start
        first, second = cat.quarantine.records()
        assert first.frame() == write([BatchOpened(batch_id="batch_old", device_id="dev_notes", opened_at=1.0)])
        assert held(second)["unreadable"].startswith("a first-layout image row without its outbox entry")
        applied, refused_now = anyio.run(cat.apply_quarantined, None)
        assert [r.id for r in applied] == ["old0"] and "Unreadable" in refused_now["old1"]
        assert _notes(cat) == ["batch_old"]
        assert qfile.read_bytes() == old_frame(msgspec.msgpack.encode(old[1]))  # kept byte for byte
        assert [r.id for r in cat.quarantine.remove({"old1"})] == ["old1"] and cat.quarantine.count == 0


def old_frame(body: bytes) -> bytes:
    return struct.pack("<II", len(body), zlib.crc32(body)) + body
