"""Journaled catalog writes on a real DuckDB file: acknowledged once fsynced in the journal, moved
into DuckDB in batches, always visible to readers, and replayed after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gateway.catalog import Catalog, Conn
from gateway.catalog.journal import Entry, Rows, frame
from gateway.errors import ServiceUnavailable

ROOT = Path(__file__).resolve().parents[2]
SLOW = 60.0  # an apply delay no test waits for: entries reach DuckDB only when something asks


class Notes:
    """A JournalWriter: each item a row of `notes`; a count kept in memory, as uploads keep seq."""

    def __init__(self) -> None:
        self.count = 0
        self._undo = 0
        self.fail_prepare = False

    def prepare(self, conn: Conn, items: list[str]) -> tuple[list[Any], list[Entry]]:
        self._undo = self.count
        self.count += len(items)
        if self.fail_prepare:
            raise RuntimeError("prepare refused")
        return ([f"ok:{i}" for i in items],
                [Entry(rows=[Rows(table="notes", columns=("v",), values=[(i,)])]) for i in items])

    def undo(self) -> None:
        self.count = self._undo


def _open(path: Path, **kw: Any) -> Catalog:
    cat = Catalog(path, **kw)
    cat.open()
    cat.write_sync(lambda c: c.execute("CREATE TABLE IF NOT EXISTS notes (v VARCHAR PRIMARY KEY)"))
    return cat


def _notes(cat: Catalog) -> list[str]:
    return sorted(r[0] for r in cat.read_sync(lambda c: c.execute("SELECT v FROM notes").fetchall()))


def _wait_applied(cat: Catalog) -> None:
    """Until the writer has moved every journal entry into DuckDB on its own (at most 10 s)."""
    deadline = time.monotonic() + 10
    while cat.pending_entries and time.monotonic() < deadline:
        time.sleep(0.02)


def _in_duckdb(cat: Catalog) -> int:
    """Rows DuckDB holds, read on the writer's own connection (no flush)."""
    return cat.submit(lambda c: c.execute("SELECT count(*) FROM notes").fetchone()[0]).result()  # type: ignore[index]


def test_acknowledged_from_the_journal_then_applied_in_one_transaction(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        writer = Notes()
        commits = cat.commits
        futures = [cat.submit_journaled(writer, f"n{i}") for i in range(20)]
        assert [f.result(timeout=10) for f in futures] == [f"ok:n{i}" for i in range(20)]
        assert cat.pending_entries == 20 and cat.commits == commits  # acknowledged: in the journal only
        assert cat.journal.size > 0
        assert _notes(cat) == sorted(f"n{i}" for i in range(20))  # a read moves them in first
        assert cat.pending_entries == 0 and cat.journal.size == 0
        assert cat.commits == commits + 2  # one transaction for all 20 (and the read's flush op)


def test_entries_are_applied_after_the_delay_and_once_enough_wait(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=0.2, apply_max=1000)) as cat:
        writer = Notes()
        cat.submit_journaled(writer, "a").result(timeout=10)
        _wait_applied(cat)
        assert _in_duckdb(cat) == 1
    with closing(_open(tmp_path / "c2.duckdb", apply_delay=SLOW, apply_max=5)) as cat:
        futures = [cat.submit_journaled(Notes(), f"m{i}") for i in range(5)]
        [f.result(timeout=10) for f in futures]
        _wait_applied(cat)
        assert _in_duckdb(cat) == 5


def test_other_writes_run_after_the_entries_before_them(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        cat.submit_journaled(Notes(), "first").result(timeout=10)
        seen = cat.write_sync(lambda c: c.execute("SELECT count(*) FROM notes WHERE v = 'first'").fetchone())
        assert seen == (1,)


def test_a_failed_prepare_or_journal_write_acknowledges_nothing_and_is_undone(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        writer = Notes()
        cat.submit_journaled(writer, "kept").result(timeout=10)
        writer.fail_prepare = True
        with pytest.raises(RuntimeError):
            cat.submit_journaled(writer, "refused").result(timeout=10)
        assert writer.count == 1  # undone
        writer.fail_prepare = False
        os.close(cat.journal._fd)  # the journal's disk goes away: the write fails
        cat.journal._fd = os.open(os.devnull, os.O_RDONLY)
        with pytest.raises(ServiceUnavailable):
            cat.submit_journaled(writer, "lost-disk").result(timeout=10)
        assert writer.count == 1 and cat.pending_entries == 1
        assert _notes(cat) == ["kept"]


def test_close_applies_everything_and_leaves_an_empty_journal(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    cat = _open(path, apply_delay=SLOW)
    for i in range(7):
        cat.submit_journaled(Notes(), f"c{i}").result(timeout=10)
    cat.close()
    assert (tmp_path / "c.duckdb.journal").stat().st_size == 0
    with closing(_open(path)) as cat:
        assert cat.replayed == 0 and len(_notes(cat)) == 7


CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_catalog_journal import Notes, _open
cat = _open(Path({path!r}), apply_delay=3600.0, apply_max=10**9)
writer = Notes()
for i in range(50):
    cat.submit_journaled(writer, f"k{{i}}").result()
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
        cat.submit_journaled(Notes(), f"d{i}").result(timeout=10)
    saved = (tmp_path / "c.duckdb.journal").read_bytes()
    cat.close()
    (tmp_path / "c.duckdb.journal").write_bytes(saved)  # as if the reset had not happened
    with closing(_open(path)) as cat:
        assert cat.replayed == 3 and _notes(cat) == ["d0", "d1", "d2"]


class Later(Notes):
    """Rows whose entry also writes a file into a folder that does not exist yet: DuckDB refuses
    them with an I/O error (the disk's trouble, not the record's, so the record waits; a record
    refused for its own reason is set aside instead: test_journal_quarantine.py)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def prepare(self, conn: Conn, items: list[str]) -> tuple[list[Any], list[Entry]]:
        results, _ = super().prepare(conn, items)
        copy = (f"COPY (SELECT 1 AS v) TO '{self.folder / 'out.csv'}'", [])
        return results, [Entry(rows=[Rows(table="notes", columns=("v",), values=[(i,)])], statements=[copy])
                         for i in items]


def test_while_duckdb_refuses_the_journal_nothing_more_is_acknowledged_and_nothing_is_lost(tmp_path: Path) -> None:
    cat = _open(tmp_path / "c.duckdb", apply_delay=0.05)
    try:
        later = Later(tmp_path / "later")
        assert cat.submit_journaled(later, "early").result(timeout=10) == "ok:early"  # journaled: answered
        time.sleep(0.3)  # its apply failed: no folder
        assert cat.pending_entries == 1
        with pytest.raises(ServiceUnavailable):
            cat.submit_journaled(Notes(), "refused").result(timeout=10)
        with pytest.raises(ServiceUnavailable):
            cat.flush_sync()  # readers get 503 rather than a state without the answered write
        (tmp_path / "later").mkdir()
        _wait_applied(cat)  # retried on the writer's own schedule
        assert cat.pending_entries == 0
        assert _notes(cat) == ["early"]
        assert cat.submit_journaled(Notes(), "after").result(timeout=10) == "ok:after"
        assert cat.quarantine.count == 0
    finally:
        cat.close()


def test_a_journal_that_cannot_be_replayed_stops_the_open_and_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    cat = _open(path, apply_delay=SLOW)
    cat.close()
    journal = tmp_path / "c.duckdb.journal"
    copy = (f"COPY (SELECT 1 AS v) TO '{tmp_path / 'nowhere' / 'out.csv'}'", [])  # an I/O error: not set aside
    journal.write_bytes(frame(Entry(rows=[Rows(table="notes", columns=("v",), values=[("x",)])], statements=[copy])))
    saved = journal.read_bytes()
    with pytest.raises(ServiceUnavailable) as caught:
        Catalog(path).open()
    assert str(journal) in str(caught.value.details)
    assert journal.read_bytes() == saved
    journal.write_bytes(b"")
    cat = _open(path)  # the file is free again: the failed open let go of DuckDB's lock
    cat.close()
