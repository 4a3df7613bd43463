"""Uploads recorded while their objects are being stored (`NewImage.storing`), on a real DuckDB
file: a batch is never sealed while a member's object may be missing, a withdrawn upload leaves
no row behind (nor an empty batch), and the journal replays withdrawals as they happened."""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from gateway.batches import queries as batch_queries
from gateway.catalog import Catalog
from gateway.catalog.collecting import NewImage, Placed
from gateway.errors import ServiceUnavailable
from gateway.ingest.reconcile import Reconciler, settle_intents
from gateway.storage import FolderStore

SLOW = 60.0  # an apply delay no test waits for: entries reach DuckDB only when something asks


def image(n: int, device: str = "dev_a", max_images: int = 3, storing: bool = True) -> NewImage:
    return NewImage(image_id=f"img_{n}", device_id=device, filename=f"f{n}.jpg", content_type="image/jpeg",
                    size=10 * n, xxh3_128=f"{n:032x}", storage_key=f"raw-data/{n}_f{n}.jpg", metadata=None,
                    received_at=100.0 + n, outbox_state="pending", batch_max_images=max_images, storing=storing)


def _open(path: Path, **kw: Any) -> Catalog:
    cat = Catalog(path, **kw)
    cat.open()
    return cat


def record(cat: Catalog, new: NewImage) -> Placed:
    return cat.submit_upload(new).result(timeout=10)


def stored(cat: Catalog, n: int) -> str | None:
    return cat.submit_stored(f"img_{n}", 500.0).result(timeout=10)


def withdrawn(cat: Catalog, new: NewImage, placed: Placed) -> str | None:
    return cat.submit_withdrawn(new.image_id, new.device_id, placed.batch_id, new.size, 400.0).result(timeout=10)


def batch(cat: Catalog, batch_id: str) -> tuple[str, int, int]:
    b = cat.read_sync(lambda c: batch_queries.read_batch(c, batch_id))
    return b["state"], b["image_count"], b["total_bytes"]


def rows(cat: Catalog) -> tuple[list[str], list[str], list[str]]:
    """image ids in `images` and in `outbox`, and every batch id."""
    return (sorted(r[0] for r in cat.read_sync(lambda c: c.execute("SELECT image_id FROM images").fetchall())),
            sorted(r[0] for r in cat.read_sync(lambda c: c.execute("SELECT image_id FROM outbox").fetchall())),
            sorted(r[0] for r in cat.read_sync(lambda c: c.execute("SELECT batch_id FROM batches").fetchall())))


def test_a_batch_filled_while_objects_are_on_their_way_is_sealed_when_the_last_is_stored(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb")) as cat:
        placed = [record(cat, image(n)) for n in (1, 2, 3)]
        assert [p.sealed for p in placed] == [False, False, True]  # the third fills it...
        first = placed[0].batch_id
        assert batch(cat, first) == ("collecting", 3, 60)  # ...but objects are missing: not sealed
        nxt = record(cat, image(4))
        assert nxt.batch_id != first  # a closing batch takes no more uploads
        assert stored(cat, 3) is None and stored(cat, 1) is None
        assert batch(cat, first)[0] == "collecting"
        assert stored(cat, 2) == first  # the last member's object: sealed now, with its counts
        assert batch(cat, first) == ("sealed", 3, 60)
        assert stored(cat, 2) is None  # a second word about it changes nothing
        assert batch(cat, nxt.batch_id) == ("collecting", 1, 40)


def test_a_withdrawn_upload_leaves_no_row_and_a_closing_batch_seals_without_it(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb")) as cat:
        news = [image(n) for n in (1, 2, 3)]
        placed = [record(cat, n) for n in news]
        first = placed[0].batch_id
        stored(cat, 1)
        stored(cat, 3)
        assert withdrawn(cat, news[1], placed[1]) == first  # the last one waited for: sealed without it
        assert batch(cat, first) == ("sealed", 2, 40)
        images, outbox, _ = rows(cat)
        assert images == outbox == ["img_1", "img_3"]


def test_withdrawing_the_only_upload_of_a_batch_removes_the_batch_too(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb")) as cat:
        new = image(1)
        placed = record(cat, new)
        assert withdrawn(cat, new, placed) is None
        assert rows(cat) == ([], [], [])
        again = record(cat, image(2))  # the device's next upload opens a batch of its own
        assert again.batch_id != placed.batch_id
        assert batch(cat, again.batch_id) == ("collecting", 1, 20)


def test_a_batch_due_by_time_waits_for_its_members_objects(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb")) as cat:
        placed = record(cat, image(1, max_images=100))
        record(cat, image(2, max_images=100, storing=False))
        assert cat.write_sync(lambda c: cat.collecting.seal_due(c, 10_000.0, 60.0)) == []
        assert batch(cat, placed.batch_id) == ("collecting", 2, 30)
        assert cat.write_sync(lambda c: cat.collecting.seal(c, placed.batch_id, 10_000.0)) == "closing"
        assert record(cat, image(3, max_images=100)).batch_id != placed.batch_id
        assert stored(cat, 1) == placed.batch_id
        assert batch(cat, placed.batch_id) == ("sealed", 2, 30)


def test_a_batch_is_never_sealed_with_a_member_still_storing_even_by_hand(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb")) as cat:
        placed = record(cat, image(1, max_images=100))
        assert cat.write_sync(lambda c: cat.collecting.seal(c, placed.batch_id, 200.0)) == "closing"
        assert batch(cat, placed.batch_id)[0] == "collecting"
        stored(cat, 1)
        assert batch(cat, placed.batch_id) == ("sealed", 1, 10)


def test_the_journal_replays_a_withdrawal_and_a_deferred_seal_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    cat = _open(path, apply_delay=SLOW)
    news = [image(n) for n in (1, 2, 3)]
    placed = [record(cat, n) for n in news]
    stored(cat, 1)
    stored(cat, 2)
    withdrawn(cat, news[2], placed[2])
    saved = (tmp_path / "c.duckdb.journal").read_bytes()
    cat.close()
    # Twice over, as after a crash between DuckDB's commit and the journal's reset.
    (tmp_path / "c.duckdb.journal").write_bytes(saved)
    with closing(_open(path)) as again:
        assert again.replayed > 0
        assert rows(again)[0] == ["img_1", "img_2"]
        assert batch(again, placed[0].batch_id) == ("sealed", 2, 30)


def test_a_full_batch_whose_seal_a_crash_cut_short_is_sealed_before_the_next_upload(tmp_path: Path) -> None:
    """The objects were stored, but the process died before the word reached the writer."""
    path = tmp_path / "c.duckdb"
    with closing(_open(path)) as cat:
        placed = [record(cat, image(n)) for n in (1, 2, 3)]
    first = placed[0].batch_id
    with closing(_open(path)) as cat:
        assert batch(cat, first) == ("collecting", 3, 60)
        nxt = record(cat, image(4, storing=False))
        assert nxt.batch_id != first
        assert batch(cat, first) == ("sealed", 3, 60)


def test_a_withdrawal_of_a_row_an_earlier_process_left_counts_its_batch_again(tmp_path: Path) -> None:
    """Should a batch be sealed with a row an earlier process left without its object anyway (the
    row not held at start: its intent lost, say), the row's withdrawal counts the batch again and
    asks for its manifest again."""
    path = tmp_path / "c.duckdb"
    news = [image(n, max_images=100) for n in (1, 2)]
    with closing(_open(path)) as cat:
        placed = [record(cat, n) for n in news]
    batch_id = placed[0].batch_id
    with closing(_open(path)) as cat:  # a new process: nothing is known to be storing
        assert cat.write_sync(lambda c: cat.collecting.seal_due(c, 10_000.0, 60.0)) == [batch_id]
        cat.write_sync(lambda c: c.execute(
            "UPDATE batches SET manifest_key = 'batches/x/manifest.parquet' WHERE batch_id = ?", [batch_id]))
        withdrawn(cat, news[1], placed[1])
        assert batch(cat, batch_id) == ("sealed", 1, 10)
        key = cat.read_sync(lambda c: c.execute(
            "SELECT manifest_key FROM batches WHERE batch_id = ?", [batch_id]).fetchone())
        assert key == (None,)  # its manifest is written again
        assert rows(cat)[0] == ["img_1"]



def test_after_a_restart_a_batch_holding_a_row_without_its_object_is_not_sealed_until_it_is_settled(
        tmp_path: Path) -> None:
    """The reconciliation holds a leftover row (`hold`) before the sealer or any upload runs: the
    batch is due by time and full, yet it waits; the row's withdrawal then seals it without it."""
    path = tmp_path / "c.duckdb"
    news = [image(n) for n in (1, 2, 3)]
    with closing(_open(path)) as cat:
        placed = [record(cat, n) for n in news]
        stored(cat, 1)
        stored(cat, 2)  # the process dies before image 3's PUT: its batch is full and closing
    batch_id = placed[0].batch_id
    with closing(_open(path)) as cat:
        assert cat.write_sync(lambda c: cat.collecting.hold(c, ["img_3", "img_404"])) == 1
        assert cat.write_sync(lambda c: cat.collecting.seal_due(c, 10_000.0, 60.0)) == []
        nxt = record(cat, image(4, storing=False))  # full: the device's next upload goes elsewhere...
        assert nxt.batch_id != batch_id
        assert batch(cat, batch_id) == ("collecting", 3, 60)  # ...and the batch is not sealed with a hole
        assert withdrawn(cat, news[2], placed[2]) == batch_id
        assert batch(cat, batch_id) == ("sealed", 2, 30)
        assert rows(cat)[0] == ["img_1", "img_2", "img_4"]


def test_a_closing_batch_a_crash_left_beside_a_newer_one_is_not_sealed_with_a_hole(tmp_path: Path) -> None:
    """The device had two collecting batches when the process died: the full one, waiting for its
    last member's object, and the next. Held before the batches are read, it stays closing."""
    path = tmp_path / "c.duckdb"
    news = [image(n) for n in (1, 2, 3)]
    with closing(_open(path)) as cat:
        placed = [record(cat, n) for n in news]
        stored(cat, 1)
        stored(cat, 2)
        newer = record(cat, image(4, storing=False))
    full = placed[0].batch_id
    assert newer.batch_id != full
    with closing(_open(path)) as cat:
        assert cat.write_sync(lambda c: cat.collecting.hold(c, ["img_3"])) == 1
        cat.write_sync(cat.uploads.load)  # what the ingestor's start does next
        assert batch(cat, full)[0] == "collecting"
        assert withdrawn(cat, news[2], placed[2]) == full
        assert batch(cat, full) == ("sealed", 2, 30)
        assert batch(cat, newer.batch_id) == ("collecting", 1, 40)


def test_the_reconciliation_withdraws_a_row_whose_object_is_there_but_not_whole(tmp_path: Path) -> None:
    """A leftover intent names a row whose object has another size than recorded (a PUT cut
    short, or an emptied hard link): never acknowledged, so the row is withdrawn and the object
    removed; a row with its whole object is kept."""
    spool = tmp_path / "spool"
    spool.mkdir()
    store = FolderStore(tmp_path / "objects")
    with closing(_open(tmp_path / "c.duckdb")) as cat:
        uids = [uuid.uuid4() for _ in range(2)]
        news = [msgspec.structs.replace(image(n), image_id=f"img_{u}", storage_key=f"raw-data/{u.hex}_f.jpg")
                for n, u in zip((1, 2), uids, strict=True)]
        for new, uid in zip(news, uids, strict=True):
            record(cat, new)
            (spool / f"{uid.hex}.part").touch()
        store.put_bytes(news[0].storage_key, b"x" * news[0].size, "image/jpeg")  # whole
        store.put_bytes(news[1].storage_key, b"x" * (news[1].size - 1), "image/jpeg")  # cut short
        report = settle_intents(cat, store, spool, quiet_until=float("inf"))
        assert report.committed == 1 and report.withdrawn == [news[1].image_id]
        assert report.strays_removed == [news[1].storage_key]
        assert rows(cat)[0] == [news[0].image_id]
        assert store.stat(news[1].storage_key) is None and list(spool.iterdir()) == []


@pytest.mark.parametrize("landed", [True, False], ids=["object-landed", "object-missing"])
@pytest.mark.parametrize("which", ["settle_at_start", "settle_later"])
def test_a_batch_the_reconciliation_lets_seal_is_announced(tmp_path: Path, which: str, landed: bool) -> None:
    """The process died before the word that a batch member's object was stored; after the restart
    the batch fell due while that row was held. The pass that settles the row (kept: its object
    landed; withdrawn: it never did) lets the writer seal the batch, and the batch is announced
    (`on_sealed`: its manifest is due now, not at the manifest writer's next scan)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    store = FolderStore(tmp_path / "objects")
    path = tmp_path / "c.duckdb"
    uids = [uuid.uuid4() for _ in range(3)]
    news = [msgspec.structs.replace(image(n), image_id=f"img_{u}", storage_key=f"raw-data/{u.hex}_f.jpg")
            for n, u in zip((1, 2, 3), uids, strict=True)]
    with closing(_open(path)) as cat:
        placed = [record(cat, new) for new in news]
        for new in news[:2]:
            store.put_bytes(new.storage_key, b"x" * new.size, "image/jpeg")
            cat.submit_stored(new.image_id, 300.0).result(timeout=10)
        if landed:  # the PUT landed; the process died before the word that it had
            store.put_bytes(news[2].storage_key, b"x" * news[2].size, "image/jpeg")
        (spool / f"{uids[2].hex}.part").touch()
    batch_id = placed[0].batch_id
    started_at = time.time() - 100  # the quiet period after the crash is over
    os.utime(spool / f"{uids[2].hex}.part", (started_at - 10, started_at - 10))  # left by the earlier process
    with closing(_open(path)) as cat:
        assert cat.write_sync(lambda c: cat.collecting.hold(c, [news[2].image_id])) == 1
        assert cat.write_sync(lambda c: cat.collecting.seal_due(c, 10_000.0, 60.0)) == []  # closing: it waits
        announced: list[tuple[str, int]] = []
        rec = Reconciler(cat, store, spool, lambda: (), started_at,
                         on_sealed=lambda b: announced.append((b, threading.get_ident())))
        anyio.run(getattr(rec, which))
        assert announced == [(batch_id, threading.get_ident())]  # on the event loop's thread, not a worker's
        assert batch(cat, batch_id) == (("sealed", 3, 60) if landed else ("sealed", 2, 30))
        assert list(spool.iterdir()) == []


class _StoreGoingAway(FolderStore):
    """Answers the first `stat`, then is unreachable."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.stats = 0

    def stat(self, key: str) -> Any:
        self.stats += 1
        if self.stats > 1:
            raise ServiceUnavailable("Object store unreachable", "gone")
        return super().stat(key)


def test_a_batch_sealed_before_the_start_up_pass_failed_is_still_announced(tmp_path: Path) -> None:
    """The start-up pass settles the leftover row (sealing the batch that waited for it), then the
    store goes away while recent objects are checked: the pass fails, and the seal is announced."""
    spool = tmp_path / "spool"
    spool.mkdir()
    store = _StoreGoingAway(tmp_path / "objects")
    path = tmp_path / "c.duckdb"
    uid = uuid.uuid4()
    new = msgspec.structs.replace(image(1, max_images=1), image_id=f"img_{uid}",
                                  storage_key=f"raw-data/{uid.hex}_f.jpg")
    with closing(_open(path)) as cat:
        batch_id = record(cat, new).batch_id  # full at once, closing: its one member's object is on its way
        store.put_bytes(new.storage_key, b"x" * new.size, "image/jpeg")
        (spool / f"{uid.hex}.part").touch()  # the process died before the word that it was stored
    with closing(_open(path)) as cat:
        assert cat.write_sync(lambda c: cat.collecting.hold(c, [new.image_id])) == 1
        assert cat.write_sync(lambda c: cat.collecting.seal_due(c, 10_000.0, 60.0)) == []
        announced: list[str] = []
        rec = Reconciler(cat, store, spool, lambda: (), time.time() - 100, on_sealed=announced.append)
        with pytest.raises(ServiceUnavailable):
            anyio.run(rec.settle_at_start)
        assert announced == [batch_id]
        assert batch(cat, batch_id) == ("sealed", 1, 10)
