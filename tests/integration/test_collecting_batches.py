"""Collecting batches kept in memory by the catalog writer (`catalog.collecting.CollectingBatches`), on a real
DuckDB file: counts stay exact through failed transactions, restarts and every way of sealing."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gateway.batches import queries as batch_queries
from gateway.catalog import Catalog, Conn
from gateway.catalog.apply import insert_rows
from gateway.catalog.collecting import CollectingBatches

_seq = itertools.count(1)


def _upload(collecting: CollectingBatches, device: str, size: int, max_images: int = 3, now: float = 100.0):
    def op(conn: Conn) -> tuple[str, bool]:
        ((batch_id, full),) = collecting.place(conn, [(device, size)], now, max_images)
        n = next(_seq)
        insert_rows(conn, "images", ("image_id", "seq", "batch_id", "device_id", "filename", "content_type", "size",
                                     "xxh3_128", "storage_key", "received_at"),
                    [(f"img_{n}", n, batch_id, device, "f.jpg", "image/jpeg", size, f"{n:032x}", f"raw/{n}", now)])
        return batch_id, full

    return op


def _counts(catalog: Catalog, batch_id: str) -> tuple[str, int, int]:
    b = catalog.read_sync(lambda c: batch_queries.read_batch(c, batch_id))
    return b["state"], b["image_count"], b["total_bytes"]


@pytest.fixture
def catalog(tmp_path: Path):
    cat = Catalog(tmp_path / "catalog.duckdb")
    cat.open()
    yield cat
    cat.close()


def test_counts_are_exact_while_collecting_and_written_when_full(catalog: Catalog) -> None:
    collecting = CollectingBatches(catalog)
    first, full = catalog.write_sync(_upload(collecting, "dev_a", 10))
    assert not full and _counts(catalog, first) == ("collecting", 1, 10)
    catalog.write_sync(_upload(collecting, "dev_a", 20))
    assert _counts(catalog, first) == ("collecting", 2, 30)
    same, full = catalog.write_sync(_upload(collecting, "dev_a", 30))
    assert same == first and full
    assert _counts(catalog, first) == ("sealed", 3, 60)
    row = catalog.read_sync(lambda c: c.execute(
        "SELECT image_count, total_bytes FROM batches WHERE batch_id = ?", [first]).fetchone())
    assert row == (3, 60)  # the row itself carries them once sealed
    nxt, _ = catalog.write_sync(_upload(collecting, "dev_a", 5))
    assert nxt != first and _counts(catalog, nxt) == ("collecting", 1, 5)


def test_a_rolled_back_transaction_leaves_no_phantom_count(catalog: Catalog) -> None:
    collecting = CollectingBatches(catalog)
    batch_id, _ = catalog.write_sync(_upload(collecting, "dev_a", 10))

    def fails(conn: Conn) -> None:
        _upload(collecting, "dev_a", 10)(conn)
        _upload(collecting, "dev_a", 10)(conn)  # in memory the batch is now full and sealed...
        raise RuntimeError("disk trouble")  # ...but nothing of it commits

    with pytest.raises(RuntimeError):
        catalog.write_sync(fails)
    assert _counts(catalog, batch_id) == ("collecting", 1, 10)
    again, full = catalog.write_sync(_upload(collecting, "dev_a", 7))
    assert again == batch_id and not full
    assert _counts(catalog, batch_id) == ("collecting", 2, 17)


def test_a_restart_counts_from_the_image_rows(catalog: Catalog) -> None:
    before = CollectingBatches(catalog)
    batch_id, _ = catalog.write_sync(_upload(before, "dev_a", 10))
    catalog.write_sync(_upload(before, "dev_a", 10))
    after = CollectingBatches(catalog)  # a new process: nothing in memory
    same, full = catalog.write_sync(_upload(after, "dev_a", 10))
    assert same == batch_id and full  # the third image fills it: the count came from the catalog
    assert _counts(catalog, batch_id) == ("sealed", 3, 30)


def test_sealing_by_time_and_by_hand_writes_the_counts(catalog: Catalog) -> None:
    collecting = CollectingBatches(catalog)
    old, _ = catalog.write_sync(_upload(collecting, "dev_a", 10, max_images=100, now=100.0))
    catalog.write_sync(_upload(collecting, "dev_a", 11, max_images=100, now=150.0))
    young, _ = catalog.write_sync(_upload(collecting, "dev_b", 12, max_images=100, now=190.0))
    assert catalog.write_sync(lambda c: collecting.seal_due(c, 200.0, 60.0)) == [old]
    assert _counts(catalog, old) == ("sealed", 2, 21)
    assert _counts(catalog, young) == ("collecting", 1, 12)
    batch, sealed_now = catalog.write_sync(lambda c: batch_queries.seal_by_hand(c, collecting, young, 201.0))
    assert sealed_now and (batch["state"], batch["image_count"], batch["total_bytes"]) == ("sealed", 1, 12)
    batch, sealed_now = catalog.write_sync(lambda c: batch_queries.seal_by_hand(c, collecting, young, 202.0))
    assert not sealed_now and batch["sealed_at"] == 201.0
    fresh, _ = catalog.write_sync(_upload(collecting, "dev_b", 1, max_images=100, now=203.0))
    assert fresh != young  # a new batch opens after a seal by hand
    listed, total = catalog.read_sync(lambda c: batch_queries.list_batches(c, "collecting", 10, 0))
    assert total == 1 and [(b["batch_id"], b["image_count"]) for b in listed] == [(fresh, 1)]


def test_an_older_second_collecting_batch_of_a_device_is_sealed_at_load(catalog: Catalog) -> None:
    """One collecting batch per device: a catalog holding two (not made by this code) is mended."""
    def seed(conn: Conn) -> None:
        for batch_id, opened in (("batch_old", 10.0), ("batch_new", 20.0)):
            conn.execute("INSERT INTO batches (batch_id, device_id, state, opened_at) "
                         "VALUES (?, 'dev_a', 'collecting', ?)", [batch_id, opened])
            n = next(_seq)
            insert_rows(conn, "images", ("image_id", "seq", "batch_id", "device_id", "filename", "content_type",
                                         "size", "xxh3_128", "storage_key", "received_at"),
                        [(f"img_{n}", n, batch_id, "dev_a", "f.jpg", "image/jpeg", 4, f"{n:032x}", f"raw/{n}", 1.0)])

    catalog.write_sync(seed)
    collecting = CollectingBatches(catalog)
    batch_id, _ = catalog.write_sync(_upload(collecting, "dev_a", 6, max_images=100))
    assert batch_id == "batch_new"
    assert _counts(catalog, "batch_old") == ("sealed", 1, 4)
    assert _counts(catalog, "batch_new") == ("collecting", 2, 10)
