"""Issue 23, item 12: a journal record DuckDB refuses is set aside; the catalog keeps serving.

Before: moving the journal into DuckDB failed as a whole, and from then on every read and write
(readiness included) was refused until a restart, whose replay refused the same record again.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.catalog import Catalog, Conn
from gateway.catalog.journal import Entry, Rows, frame
from gateway.catalog.quarantine import held
from tests.integration.test_catalog_journal import SLOW, _notes, _open

pytestmark = pytest.mark.integration


def _note(v: str | None, table: str = "notes") -> Entry:
    return Entry(rows=[Rows(table=table, columns=("v",), values=[(v,)])])


class Entries:
    """A JournalWriter that journals the entries it is given as they are."""

    def prepare(self, conn: Conn, items: list[Entry]) -> tuple[list[Any], list[Entry]]:
        return [None] * len(items), list(items)

    def undo(self) -> None:
        pass


def test_a_refused_record_is_set_aside_and_the_others_applied(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        writer = Entries()
        items = [_note("a"), _note("b"), _note(None), _note("c")]  # NULL: the key refuses it
        for f in [cat.submit_journaled(writer, e) for e in items]:
            f.result(timeout=10)
        assert _notes(cat) == ["a", "b", "c"]  # the read moved the journal in; no 503
        assert cat.pending_entries == 0 and cat.journal.size == 0
        (record,) = cat.quarantine.records()
        assert record.entry == _note(None) and "Constraint" in record.reason
        assert cat.quarantine.count == 1
        assert cat.quarantine.path == tmp_path / "c.duckdb.journal.quarantine"
        cat.submit_journaled(writer, _note("d")).result(timeout=10)  # still taking writes
        assert _notes(cat) == ["a", "b", "c", "d"]


def test_the_replay_sets_aside_what_duckdb_refuses_and_opens(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    with closing(_open(path)):
        pass
    rows = Rows(table="images", columns=("image_id", "storage_key", "v"), values=[("img_1", "raw-data/x_a.jpg", 1)])
    bad = Entry(rows=[rows])  # no such table
    journal = tmp_path / "c.duckdb.journal"
    journal.write_bytes(frame(_note("a")) + frame(bad) + frame(_note("b")))
    cat = Catalog(path)
    cat.open()
    with closing(cat):
        assert _notes(cat) == ["a", "b"] and cat.replayed == 3
        (record,) = cat.quarantine.records()
        assert held(record.entry) == {"tables": {"images": 1}, "image_ids": ["img_1"],
                                      "storage_keys": ["raw-data/x_a.jpg"], "statements": 0, "updates": 0}
    again = Catalog(path)  # a restart does not quarantine it twice
    again.open()
    with closing(again):
        assert again.quarantine.count == 1


def test_apply_after_a_fix_then_drop(tmp_path: Path) -> None:
    with closing(_open(tmp_path / "c.duckdb", apply_delay=SLOW)) as cat:
        writer = Entries()
        cat.submit_journaled(writer, _note("late", table="later")).result(timeout=10)
        cat.submit_journaled(writer, _note("x", table="never")).result(timeout=10)
        assert _notes(cat) == []
        first, second = cat.quarantine.records()
        applied, refused = anyio.run(cat.apply_quarantined, None)
        assert applied == [] and set(refused) == {first.id, second.id}  # nothing fixed yet: both stay
        cat.write_sync(lambda c: c.execute("CREATE TABLE later (v VARCHAR PRIMARY KEY)"))
        applied, refused = anyio.run(cat.apply_quarantined, {first.id})
        assert [r.id for r in applied] == [first.id] and refused == {}
        assert cat.read_sync(lambda c: c.execute("SELECT v FROM later").fetchall()) == [("late",)]
        assert [r.id for r in cat.quarantine.remove({second.id})] == [second.id]
        assert cat.quarantine.records() == [] and cat.quarantine.count == 0
