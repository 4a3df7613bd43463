"""The catalog writer's group commit with announced writes (`Catalog.expect`), on a real DuckDB file.

The linger in these tests is long (5 s), so that "joined the same group" and "did not wait" are
told apart by commit counts and by a wide margin of wall time, never by a tight timing bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.catalog import Catalog, Conn
from gateway.errors import ServiceUnavailable

LONG = 5.0


def _note(v: str) -> Callable[[Conn], str]:
    """A write op that notes `v` and returns it."""

    def op(conn: Conn) -> str:
        conn.execute("INSERT INTO notes VALUES (?)", [v])
        return v

    return op


@pytest.fixture
def catalog(tmp_path: Path):
    cat = Catalog(tmp_path / "catalog.duckdb", linger=LONG)
    cat.open()
    cat.write_sync(lambda c: c.execute("CREATE TABLE notes (v VARCHAR)"))
    yield cat
    cat.close()


def _notes(catalog: Catalog) -> list[str]:
    return sorted(r[0] for r in catalog.read_sync(lambda c: c.execute("SELECT v FROM notes").fetchall()))


def test_a_write_with_nothing_announced_commits_at_once(catalog: Catalog) -> None:
    started = time.monotonic()
    assert catalog.submit(_note("a")).result(timeout=LONG * 2) == "a"
    assert time.monotonic() - started < LONG / 2
    assert _notes(catalog) == ["a"]


def test_an_announced_write_joins_the_group_that_waits_for_it(catalog: Catalog) -> None:
    commits = catalog.commits
    record = catalog.expect()
    first = catalog.submit(_note("a"))  # the writer holds this group open for the announced write
    time.sleep(0.2)
    assert not first.done()
    second = record.submit(_note("b"))
    assert first.result(timeout=LONG / 2) == "a"
    assert second.result(timeout=LONG / 2) == "b"
    assert catalog.commits == commits + 1  # one transaction for both
    assert _notes(catalog) == ["a", "b"]


def test_a_called_off_write_releases_the_waiting_group(catalog: Catalog) -> None:
    record = catalog.expect()
    started = time.monotonic()
    first = catalog.submit(_note("a"))
    time.sleep(0.2)
    record.cancel()
    assert first.result(timeout=LONG / 2) == "a"
    assert time.monotonic() - started < LONG / 2
    record.cancel()  # a second call is harmless
    with pytest.raises(RuntimeError):
        record.submit(_note("b"))
    # nothing is announced any more: the next write does not wait either
    started = time.monotonic()
    assert catalog.submit(_note("c")).result(timeout=LONG * 2) == "c"
    assert time.monotonic() - started < LONG / 2


def test_leaving_the_with_block_calls_the_write_off(catalog: Catalog) -> None:
    with pytest.raises(KeyError), catalog.expect():
        raise KeyError("the object store said no")
    started = time.monotonic()
    assert catalog.submit(_note("a")).result(timeout=LONG * 2) == "a"
    assert time.monotonic() - started < LONG / 2


def test_the_group_waits_no_longer_than_the_linger(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.duckdb", linger=0.3)
    cat.open()
    try:
        cat.write_sync(lambda c: c.execute("CREATE TABLE notes (v VARCHAR)"))
        record = cat.expect()  # announced, and never sent
        started = time.monotonic()
        assert cat.submit(_note("a")).result(timeout=10) == "a"
        assert 0.25 <= time.monotonic() - started < 5  # it waited for the announced write, and gave up
        record.cancel()
    finally:
        cat.close()


def test_a_stop_while_waiting_commits_the_group_and_refuses_the_late_write(catalog: Catalog) -> None:
    record = catalog.expect()
    first = catalog.submit(_note("a"))
    time.sleep(0.2)
    started = time.monotonic()
    catalog.close()
    assert time.monotonic() - started < LONG / 2
    assert first.result(timeout=1) == "a"
    late = record.submit(_note("b"))
    with pytest.raises(ServiceUnavailable):
        late.result(timeout=1)
    catalog.open()  # the fixture closes it again; the committed write survived the stop
    assert _notes(catalog) == ["a"]
