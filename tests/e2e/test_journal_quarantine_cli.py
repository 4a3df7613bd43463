"""Issue 23, item 12, end to end: a journal record DuckDB refuses no longer stops `gateway serve`.

Before: the replay refused the record and the server would not start (and while running, every
read and write, readiness included, answered 503 until a restart that refused it again).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from gateway.catalog.journal import Entry, Rows, frame
from tests.support.client import admin_status, metrics
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e


def test_a_refused_record_is_quarantined_shown_and_settled_by_the_cli(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})
    gw.add_device("cam-q")
    assert gw.stop() == 0
    # An acknowledged image row DuckDB will not take (filename is NOT NULL), between two good records.
    bad = Entry(rows=[Rows(table="images", columns=("image_id", "storage_key", "filename"),
                           values=[("img_q1", "raw-data/abc_q.jpg", None)])])
    good = Entry(rows=[], statements=[("UPDATE devices SET last_status = 'replayed' WHERE name = 'cam-q'", [])])
    journal = gw.workdir / "data" / "catalog.duckdb.journal"
    journal.write_bytes(frame(good) + frame(bad) + frame(good))

    gw.start()  # serves: the record is set aside, not a reason to stop
    assert httpx.get(f"{gw.url}/api/ready", timeout=10).status_code == 200
    assert admin_status(gw)["journal_quarantined"] == 1
    assert "journal quarantine" in gw.cli("status").stdout
    assert metrics(gw)["acusight_gateway_journal_quarantined"] == 1.0
    devices = json.loads(gw.cli("devices", "list", "--json").stdout)
    assert [d["last_status"] for d in devices] == ["replayed"]  # the good records were applied

    (record,) = json.loads(gw.cli("journal", "quarantine", "list", "--json").stdout)
    assert record["held"]["image_ids"] == ["img_q1"] and record["held"]["storage_keys"] == ["raw-data/abc_q.jpg"]
    assert "NOT NULL" in record["reason"] or "Constraint" in record["reason"]
    listed = gw.cli("journal", "quarantine", "list").stdout
    assert "img_q1" in listed and "raw-data/abc_q.jpg" in listed

    again = gw.cli("journal", "quarantine", "apply", record["id"], check=False)
    assert again.returncode == 1 and "still refused" in again.stdout  # not fixed: it stays
    assert admin_status(gw)["journal_quarantined"] == 1

    dropped = gw.cli("journal", "quarantine", "drop", record["id"]).stdout
    assert "img_q1" in dropped and "raw-data/abc_q.jpg" in dropped
    assert "img_q1" in gw.log_path.read_text(errors="replace")  # what it held, in the log too
    assert json.loads(gw.cli("journal", "quarantine", "list", "--json").stdout) == []
    assert admin_status(gw)["journal_quarantined"] == 0
