"""An upgrade opens a journal of the first layout (SQL text, no format number): its writes are
converted into typed records and applied by this schema's appliers, after the migrations.

`tests/fixtures/journal-v0.bin` was written by the code of commit 52a8583 (its Ingestor.prepare and
outbox.DELIVERIES through its Catalog; `journal-v0.how.txt`): four uploads on two devices with
batches of 2 (one sealed by count), a held and a skipped entry, two deliveries, a readiness probe."""

from __future__ import annotations

import shutil
from contextlib import closing
from pathlib import Path

import duckdb
import msgspec
import pytest

from gateway.catalog import Catalog
from gateway.catalog.records import OutboxDelivered
from gateway.catalog.schema import MIGRATIONS
from tests.integration.test_catalog_journal import image
from tests.unit.test_journal_records import IMAGE, OLD_IMAGE_COLUMNS, old_delivery, old_frame, old_upload

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "journal-v0.bin"


def _rows(cat: Catalog, sql: str) -> list[tuple[object, ...]]:
    return cat.read_sync(lambda c: c.execute(sql).fetchall())


def test_a_journal_written_by_the_first_layout_is_applied_on_open(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    with closing(Catalog(path)) as cat:
        cat.open()
    shutil.copy(FIXTURE, tmp_path / "catalog.duckdb.journal")  # a crash left it; the catalog never took it
    with closing(Catalog(path)) as cat:
        cat.open()
        assert cat.replayed == 7 and cat.journal.size == 0 and cat.quarantine.count == 0
        batches = _rows(cat, "SELECT batch_id, device_id, state, opened_at, sealed_at, image_count, total_bytes "
                             "FROM batches ORDER BY opened_at")
        assert [b[1:] for b in batches] == [("dev_a", "sealed", 1001.0, 1002.0, 2, 300),
                                            ("dev_b", "collecting", 1003.0, None, 0, 0),
                                            ("dev_a", "collecting", 1004.0, None, 0, 0)]
        a, b, c = (row[0] for row in batches)
        images = _rows(cat, "SELECT image_id, seq, batch_id, device_id, filename, size, xxh3_128, storage_key, "
                            "metadata, received_at, fingerprint, near_duplicate_of, cloud_image_id, cloud_batch_id, "
                            "cloud_storage_key FROM images ORDER BY seq")
        key = [f"raw-data/{i:032x}_f{i}.jpg" for i in range(5)]
        assert images == [
            ("img_1", 1, a, "dev_a", "f1.jpg", 100, f"{1:032x}", key[1], b'{"k": 1}', 1001.0, 2**63 + 5, None,
             "c1", "cb1", "ck1"),
            ("img_2", 2, a, "dev_a", "f2.jpg", 200, f"{2:032x}", key[2], None, 1002.0, None, None, None, None, None),
            ("img_3", 3, b, "dev_b", "f3.jpg", 300, f"{3:032x}", key[3], None, 1003.0, None, None, None, None, None),
            ("img_4", 4, c, "dev_a", "f4.jpg", 400, f"{4:032x}", key[4], None, 1004.0, 7, "img_1", None, None, None),
        ]
        outbox = _rows(cat, "SELECT image_id, seq, device_id, size, state, attempts, created_at, next_attempt_at, "
                            "last_status, delivered_at FROM outbox ORDER BY seq")
        assert outbox == [("img_1", 1, "dev_a", 100, "delivered", 1, 1001.0, 1001.0, 201, 2000.0),
                          ("img_2", 2, "dev_a", 200, "delivered", 1, 1002.0, 1002.0, 409, 2001.0),
                          ("img_3", 3, "dev_b", 300, "held", 0, 1003.0, 1003.0, None, None),
                          ("img_4", 4, "dev_a", 400, "skipped", 0, 1004.0, 1004.0, None, None)]
        # The writer goes on from what the old journal recorded: the next seq, the open batch.
        placed = cat.submit_upload(image(5, device="dev_a", max_images=2)).result(timeout=10)
        assert (placed.seq, placed.batch_id, placed.sealed) == (5, c, True)


def test_a_first_layout_journal_is_applied_after_a_schema_migration(tmp_path: Path) -> None:
    """The catalog and its journal as a gateway of schema 4 left them (before `fingerprint` and
    `near_duplicate_of`): the new code migrates, then applies the converted records."""
    path = tmp_path / "catalog.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, ddl in enumerate(MIGRATIONS[:4], start=1):
        conn.execute(ddl)
        conn.execute("INSERT INTO schema_version VALUES (?)", [version])
    conn.close()
    old = msgspec.structs.replace(IMAGE, outbox_state="pending", fingerprint=None, near_duplicate_of=None)
    delivered = old_delivery(OutboxDelivered(image_id="img_1", at=9.0, status=201, cloud_image_id="c"))
    journal = old_frame(old_upload(old, columns=OLD_IMAGE_COLUMNS[:-2])) + old_frame(delivered)
    (tmp_path / "catalog.duckdb.journal").write_bytes(journal)
    with closing(Catalog(path)) as cat:
        cat.open()
        assert cat.replayed == 2
        assert _rows(cat, "SELECT max(version) FROM schema_version") == [(len(MIGRATIONS),)]
        assert _rows(cat, "SELECT image_id, seq, size, fingerprint, near_duplicate_of, cloud_image_id FROM images") == [
            ("img_1", 7, 123, None, None, "c")]
        assert _rows(cat, "SELECT state, image_count, total_bytes FROM batches") == [("sealed", 3, 2**40)]
        assert _rows(cat, "SELECT state, attempts, last_status FROM outbox") == [("delivered", 1, 201)]
