"""The forwarder's bookkeeping under a slow catalog, in-process: its re-reads of the outbox run
beside the sending, and a device's next image goes while the last one's delivery is still being
recorded. A re-read that sees a delivered entry as still pending must not queue it again.

Real parts (a DuckDB catalog on disk, folder storage, the loopback fake cloud); only the timing is
stretched: each delivery record and each re-read waits a little first, so that re-reads overlap
records in both orders (a re-read that ends before a record, and one that begins before a record
and ends after it). Removing either of the forwarder's two guards (`_recording`, and `_settled`
marked after the record) makes this test see resends, answered 409 by the cloud.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import create_app
from gateway.catalog.db import Expected
from gateway.catalog.records import OutboxDelivered, Record
from gateway.forward import outbox, worker
from gateway.runtime import Gateway
from tests.conftest import jpeg_bytes
from tests.support.fakecloud import FakeCloud
from tests.support.inprocess import folder_settings, wait_for

ADMIN = "races-admin-token"
RECORD_DELAY_S = 0.03  # each delivery record, before it goes to the journal
READ_DELAYS_S = (0.0, 0.045)  # re-reads of the outbox's pending heads take turns: quick, then slow


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def slowed(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    seen = {"records": 0, "reads": 0}
    write_records = Expected.write_records
    pending_heads = outbox.pending_heads

    async def slow_record(self: Expected, records: list[Record]) -> None:
        if any(isinstance(r, OutboxDelivered) for r in records):
            seen["records"] += 1
            await anyio.sleep(RECORD_DELAY_S)
        await write_records(self, records)

    def slow_read(conn: Any, per_device: int) -> list[outbox.Entry]:
        seen["reads"] += 1
        entries = pending_heads(conn, per_device)
        # The read has been taken; the world moves on before it returns. A quick one returns while
        # records that began before it are still being written; a slow one outlasts them.
        time.sleep(READ_DELAYS_S[seen["reads"] % 2])
        return entries

    monkeypatch.setattr(Expected, "write_records", slow_record)
    monkeypatch.setattr(worker.outbox, "pending_heads", slow_read)
    return seen


@pytest.mark.anyio
async def test_re_reads_overlapping_slow_delivery_records_send_nothing_twice(
    tmp_path: Path, cloud: FakeCloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = slowed(monkeypatch)
    settings = folder_settings(tmp_path, ADMIN, **{
        "GATEWAY_CLOUD_URL": cloud.url,
        "GATEWAY_FORWARD_CONCURRENCY": "4", "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2",
        "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0",
    })
    gw = Gateway(settings)
    cloud.refuse_connections()
    await gw.start()
    try:
        async with anyio.create_task_group() as tg, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(settings, gw)), base_url="http://gw", timeout=30
        ) as client:
            gw.run_background(tg)
            keys = []
            for i in range(2):
                resp = await client.post("/api/admin/devices", json={"name": f"camera-{i}"},
                                         headers={"Authorization": f"Bearer {ADMIN}"})
                assert resp.status_code == 201, resp.text
                data = resp.json()["data"]
                cloud.add_device(data["key"], device_id=data["device"]["device_id"])
                keys.append(data["key"])
            for i in range(300):  # 150 per device: more than the 32 read ahead, so re-reads happen
                resp = await client.post("/api/device/images/upload", headers={"X-Device-Key": keys[i % 2]},
                                         files={"image": (f"f{i}.jpg", jpeg_bytes(1500 + i), "image/jpeg")})
                assert resp.status_code == 201, resp.text
            cloud.accept_connections()
            await wait_for("the cloud to hold all 300", lambda: len(cloud.stored) >= 300)
            await wait_for("300 records", lambda: seen["records"] >= 300)
            await anyio.sleep(1.0)  # time for any resend a stray re-read would cause
            tg.cancel_scope.cancel()
    finally:
        await gw.stop()
    statuses = Counter(a.status for a in cloud.attempts)
    assert statuses == {201: 300}, f"resends: {statuses}"
    assert seen["reads"] >= 4, seen  # the overlap this test is about did happen
