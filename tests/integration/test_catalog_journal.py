"""Journaled catalog writes on a real DuckDB file: acknowledged once fsynced in the journal, moved
into DuckDB in batches, always visible to readers, and replayed after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gateway.catalog import Catalog, Conn, writer
from gateway.catalog.collecting import NewImage
from gateway.catalog.journal import frame
from gateway.catalog.records import BatchOpened, Frame, Record, write
from gateway.errors import ServiceUnavailable

ROOT = Path(__file__).resolve().parents[2]
SLOW = 60.0  # an apply delay no test waits for: entries reach DuckDB only when something asks


def note(v: str) -> list[Record]:
    """A journaled write of one row (a batch opened, named `v`), as the tests' unit of record."""
    return [BatchOpened(batch_id=v, device_id="dev_notes", opened_at=1.0)]


def image(n: int, device: str = "dev_a", max_images: int = 100) -> NewImage:
    return NewImage(image_id=f"img_{n}", device_id=device, filename=f"f{n}.jpg", content_type="image/jpeg",
                    size=10 * n, xxh3_128=f"{n:032x}", storage_key=f"raw-data/{n}_f{n}.jpg", metadata=None,
                    received_at=100.0 + n, outbox_state="pending", batch_max_images=max_images)


def _open(path: Path, **kw: Any) -> Catalog:
    cat = Catalog(path, **kw)
    cat.open()
    return cat


def _notes(cat: Catalog) -> list[str]:
    sql = "SELECT batch_id FROM batches WHERE device_id = 'dev_notes'"
    return sorted(r[0] for r in cat.read_sync(lambda c: c.execute(sql).fetchall()))


def _wait_applied(cat: Catalog) -> None:
    """Until the writer has moved every journal entry into DuckDB on its own (at most 10 s)."""
    deadline = time.monotonic() + 10
    while cat.pending_entries and time.monotonic() < deadline:
        time.sleep(0.02)


def _in_duckdb(cat: Catalog) -> int:
    """Rows DuckDB holds, read on the writer's own connection (no flush)."""
    sql = "SELECT count(*) FROM batches WHERE device_id = 'dev_notes'"
    return cat.submit(lambda c: c.execute(sql).fetchone()[0]).result()  # type: ignore[index]


def test_acknowledged_from_the_journal_then_applied_in_one_transaction(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        commits = cat.commits
        futures = [cat.submit_records(note(f"n{i}")) for i in range(20)]
        assert [f.result(timeout=10) for f in futures] == [None] * 20
        assert cat.pending_entries == 20 and cat.commits == commits  # acknowledged: in the journal only
        assert cat.journal.size > 0
        assert _notes(cat) == sorted(f"n{i}" for i in range(20))  # a read moves them in first
        assert cat.pending_entries == 0 and cat.journal.size == 0
        assert cat.commits == commits + 2  # one transaction for all 20 (and the read's flush op)


def test_entries_are_applied_after_the_delay_and_once_enough_wait(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=0.2, apply_max=1000)) as cat:
        cat.submit_records(note("a")).result(timeout=10)
        _wait_applied(cat)
        assert _in_duckdb(cat) == 1
    with closing(_open(tmp_path / "c2.duckdb", apply_delay=SLOW, apply_max=5)) as cat:
        futures = [cat.submit_records(note(f"m{i}")) for i in range(5)]
        [f.result(timeout=10) for f in futures]
        _wait_applied(cat)
        assert _in_duckdb(cat) == 5


def test_other_writes_run_after_the_entries_before_them(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        cat.submit_records(note("first")).result(timeout=10)
        seen = cat.write_sync(lambda c: c.execute("SELECT count(*) FROM batches WHERE batch_id = 'first'").fetchone())
        assert seen == (1,)


def test_uploads_get_seq_and_batch_in_the_writer_and_a_failed_journal_write_is_undone(tmp_path: Path) -> None:
    """The writer places uploads with catalog code only; a group whose journal write fails
    acknowledges nothing and leaves no trace in what the next upload gets."""
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        first = cat.submit_upload(image(1, max_images=3)).result(timeout=10)
        assert (first.seq, first.sealed) == (1, False)
        os.close(cat.journal._fd)  # the journal's disk goes away: the write fails
        cat.journal._fd = os.open(os.devnull, os.O_RDONLY)
        with pytest.raises(ServiceUnavailable):
            cat.submit_upload(image(2, max_images=3)).result(timeout=10)
        assert cat.pending_entries == 1
        os.close(cat.journal._fd)
        cat.journal._fd = os.open(cat.journal.path, os.O_WRONLY | os.O_APPEND)  # the disk is back
        again = [cat.submit_upload(image(n, max_images=3)).result(timeout=10) for n in (3, 4)]
        assert [(p.seq, p.batch_id, p.sealed) for p in again] == [(2, first.batch_id, False),
                                                                  (3, first.batch_id, True)]
        rows = cat.read_sync(lambda c: c.execute(
            "SELECT i.image_id, i.seq, o.state, b.state, b.image_count, b.total_bytes FROM images i "
            "JOIN outbox o USING (image_id) JOIN batches b USING (batch_id) ORDER BY i.seq").fetchall())
        assert rows == [("img_1", 1, "pending", "sealed", 3, 80), ("img_3", 2, "pending", "sealed", 3, 80),
                        ("img_4", 3, "pending", "sealed", 3, 80)]


def test_close_applies_everything_and_leaves_an_empty_journal(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    cat = _open(path, apply_delay=SLOW)
    for i in range(7):
        cat.submit_records(note(f"c{i}")).result(timeout=10)
    cat.close()
    assert (tmp_path / "c.duckdb.journal").stat().st_size == 0
    with closing(_open(path)) as cat:
        assert cat.replayed == 0 and len(_notes(cat)) == 7


CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_catalog_journal import _open, note
cat = _open(Path({path!r}), apply_delay=3600.0, apply_max=10**9)
for i in range(50):
    cat.submit_records(note(f"k{{i}}")).result()
    print(f"acked k{{i}}", flush=True)
import time
time.sleep(3600)
"""


def test_kill_9_before_the_entries_reach_duckdb_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    code = CHILD.format(root=str(ROOT), tests=str(Path(__file__).parent), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    acked = []
    assert child.stdout is not None
    for line in child.stdout:
        acked.append(line.split()[1])
        if len(acked) == 50:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (tmp_path / "c.duckdb.journal").stat().st_size > 0  # nothing was applied: all in the journal
    with closing(_open(path)) as cat:
        assert cat.replayed == 50
        assert _notes(cat) == sorted(acked)
        assert cat.journal.size == 0
    with closing(_open(path)) as cat:  # a second start replays nothing and doubles nothing
        assert cat.replayed == 0 and _notes(cat) == sorted(acked)


def test_a_replay_of_entries_already_applied_doubles_nothing(tmp_path: Path) -> None:
    """A crash between DuckDB's commit and the journal's reset: the entries are there twice."""
    path = tmp_path / "c.duckdb"
    cat = _open(path, apply_delay=SLOW)
    for i in range(3):
        cat.submit_records(note(f"d{i}")).result(timeout=10)
    saved = (tmp_path / "c.duckdb.journal").read_bytes()
    cat.close()
    (tmp_path / "c.duckdb.journal").write_bytes(saved)  # as if the reset had not happened
    with closing(_open(path)) as cat:
        assert cat.replayed == 3 and _notes(cat) == ["d0", "d1", "d2"]


def _refuse_while_missing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """DuckDB refuses to apply journal frames with an I/O error while `folder` does not exist: the
    disk's trouble, not the records' (a record refused for its own reason is set aside instead:
    test_journal_quarantine.py)."""
    real = writer.apply_frames

    def apply(conn: Conn, frames: Sequence[Frame], replay: bool) -> None:
        if not folder.exists():
            raise duckdb.IOException(f"Could not write to {folder}: No such file or directory")
        real(conn, frames, replay=replay)

    monkeypatch.setattr(writer, "apply_frames", apply)


def test_while_duckdb_refuses_the_journal_nothing_more_is_acknowledged_and_nothing_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_while_missing(monkeypatch, tmp_path / "later")
    cat = _open(tmp_path / "c.duckdb", apply_delay=0.05)
    try:
        assert cat.submit_records(note("early")).result(timeout=10) is None  # journaled: answered
        time.sleep(0.3)  # its apply failed: no folder
        assert cat.pending_entries == 1
        with pytest.raises(ServiceUnavailable):
            cat.submit_records(note("refused")).result(timeout=10)
        with pytest.raises(ServiceUnavailable):
            cat.flush_sync()  # readers get 503 rather than a state without the answered write
        (tmp_path / "later").mkdir()
        _wait_applied(cat)  # retried on the writer's own schedule
        assert cat.pending_entries == 0
        assert _notes(cat) == ["early"]
        assert cat.submit_records(note("after")).result(timeout=10) is None
        assert cat.quarantine.count == 0
    finally:
        cat.close()


def test_a_journal_that_cannot_be_replayed_stops_the_open_and_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.duckdb"
    cat = _open(path, apply_delay=SLOW)
    cat.close()
    journal = tmp_path / "c.duckdb.journal"
    journal.write_bytes(frame(write(note("x"))))
    saved = journal.read_bytes()
    _refuse_while_missing(monkeypatch, tmp_path / "nowhere")  # an I/O error: not set aside
    with pytest.raises(ServiceUnavailable) as caught:
        Catalog(path).open()
    assert str(journal) in str(caught.value.details)
    assert journal.read_bytes() == saved
    journal.write_bytes(b"")
    cat = _open(path)  # the file is free again: the failed open let go of DuckDB's lock
    cat.close()
