"""Issue 23, item 12, end to end: a journal record DuckDB refuses no longer stops `gateway serve`.

Before: the replay refused the record and the server would not start (and while running, every
read and write, readiness included, answered 503 until a restart that refused it again).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from gateway.catalog.journal import frame
from gateway.catalog.records import BatchOpened, write
from tests.integration.test_journal_quarantine import refused
from tests.support.client import admin_status, metrics
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e


def test_a_refused_record_is_quarantined_shown_and_settled_by_the_cli(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})
    gw.add_device("cam-q")
    assert gw.stop() == 0
    # An acknowledged upload DuckDB will not take (a fingerprint out of range), between two good records.
    bad = write(refused("img_q1"))
    good = [write([BatchOpened(batch_id=f"batch_good{n}", device_id="dev_good", opened_at=1.0)]) for n in (1, 2)]
    journal = gw.workdir / "data" / "catalog.duckdb.journal"
    journal.write_bytes(frame(good[0]) + frame(bad) + frame(good[1]))

    gw.start()  # serves: the record is set aside, not a reason to stop
    assert httpx.get(f"{gw.url}/api/ready", timeout=10).status_code == 200
    assert admin_status(gw)["journal_quarantined"] == 1
    assert "journal quarantine" in gw.cli("status").stdout
    assert metrics(gw)["acusight_gateway_journal_quarantined"] == 1.0
    batches = json.loads(gw.cli("batches", "list", "--json").stdout)
    assert sorted(b["batch_id"] for b in batches) == ["batch_good1", "batch_good2"]  # the good records were applied

    (record,) = json.loads(gw.cli("journal", "quarantine", "list", "--json").stdout)
    assert record["held"]["image_ids"] == ["img_q1"] and record["held"]["storage_keys"] == ["raw-data/x_a.jpg"]
    assert "Conversion" in record["reason"]
    listed = gw.cli("journal", "quarantine", "list").stdout
    assert "img_q1" in listed and "raw-data/x_a.jpg" in listed and "image_accepted 1" in listed

    again = gw.cli("journal", "quarantine", "apply", record["id"], check=False)
    assert again.returncode == 1 and "still refused" in again.stdout  # not fixed: it stays
    assert admin_status(gw)["journal_quarantined"] == 1

    dropped = gw.cli("journal", "quarantine", "drop", record["id"]).stdout
    assert "img_q1" in dropped and "raw-data/x_a.jpg" in dropped
    assert "img_q1" in gw.log_path.read_text(errors="replace")  # what it held, in the log too
    assert json.loads(gw.cli("journal", "quarantine", "list", "--json").stdout) == []
    assert admin_status(gw)["journal_quarantined"] == 0
