"""Delivery marks as the forwarder journals them: a group of deliveries in two statements."""

from __future__ import annotations

from pathlib import Path

import duckdb

from gateway.catalog.apply import apply_frames
from gateway.catalog.records import OutboxDelivered, write
from gateway.catalog.schema import migrate


def _catalog(path: Path) -> duckdb.DuckDBPyConnection:
    conn = duckdb.connect(str(path))
    migrate(conn)
    for i, state in enumerate(("pending", "pending", "pending", "dead"), start=1):
        conn.execute(
            "INSERT INTO outbox (image_id, seq, device_id, size, state, created_at, next_attempt_at) "
            "VALUES (?, ?, 'dev', 10, ?, 1.0, 1.0)", [f"img_{i}", i, state])
        conn.execute(
            "INSERT INTO images (image_id, seq, batch_id, device_id, filename, content_type, size, xxh3_128, "
            "storage_key, received_at, cloud_image_id) VALUES (?, ?, 'batch_1', 'dev', 'f.jpg', 'image/jpeg', 10, "
            "?, ?, 1.0, ?)", [f"img_{i}", i, f"{i:032x}", f"raw-data/{i}", "kept" if i == 3 else None])
    return conn


def test_a_group_of_deliveries_marks_each_with_its_own_answer(tmp_path: Path) -> None:
    conn = _catalog(tmp_path / "catalog.duckdb")
    frames = [write([d]) for d in [
        OutboxDelivered(image_id="img_1", at=100.0, status=201, cloud_image_id="c1", cloud_batch_id="cb",
                        cloud_storage_key="ck1"),
        OutboxDelivered(image_id="img_2", at=101.0, status=409),  # no ids in the answer
        OutboxDelivered(image_id="img_3", at=102.0, status=201, cloud_batch_id="cb"),
        OutboxDelivered(image_id="img_4", at=103.0, status=201),  # dead meanwhile: stays dead
    ]]
    apply_frames(conn, frames, replay=False)
    rows = conn.execute(
        "SELECT image_id, state, attempts, last_status, delivered_at FROM outbox ORDER BY seq").fetchall()
    assert rows == [("img_1", "delivered", 1, 201, 100.0), ("img_2", "delivered", 1, 409, 101.0),
                    ("img_3", "delivered", 1, 201, 102.0), ("img_4", "dead", 0, None, None)]
    ids = conn.execute("SELECT image_id, cloud_image_id, cloud_batch_id, cloud_storage_key FROM images ORDER BY seq"
                       ).fetchall()
    assert ids == [("img_1", "c1", "cb", "ck1"), ("img_2", None, None, None), ("img_3", "kept", "cb", None),
                   ("img_4", None, None, None)]


def test_journaled_deliveries_applied_twice_count_once(tmp_path: Path) -> None:
    """A replay after a crash between DuckDB's commit and the journal's reset runs them again."""
    conn = _catalog(tmp_path / "catalog.duckdb")
    frames = [write([OutboxDelivered(image_id="img_1", at=100.0, status=201, cloud_image_id="c1")]),
              write([OutboxDelivered(image_id="img_2", at=101.0, status=409)])]
    for _ in range(2):
        apply_frames(conn, frames, replay=True)
    rows = conn.execute("SELECT image_id, state, attempts, delivered_at FROM outbox ORDER BY seq").fetchall()
    assert rows[:2] == [("img_1", "delivered", 1, 100.0), ("img_2", "delivered", 1, 101.0)]
    assert conn.execute("SELECT cloud_image_id FROM images WHERE image_id = 'img_1'").fetchone() == ("c1",)
