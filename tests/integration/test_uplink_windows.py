"""Sending windows in-process with a shifted clock (docs/uplink.md): the gateway believes it is a few
seconds before a window opens. Outside the window only the `always` class moves; the window's start
wakes the forwarder at once and the rest drains at the window's cap. Real parts otherwise: a DuckDB
catalog on disk, folder storage, the loopback fake cloud.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import pytest

from gateway.app import create_app
from gateway.runtime import Gateway
from tests.conftest import jpeg_bytes
from tests.support.fakecloud import FakeCloud
from tests.support.inprocess import folder_settings, wait_for

ADMIN = "windows-admin-token"
CAP = 300_000  # bytes/s in the window
LEAD_S = 25.0  # real seconds from start-up to the window's start
ROUTINE, ROUTINE_BYTES = 15, 100_000
CONFIG = f"""
[forward]
timezone = "UTC"
concurrency = 4
bandwidth_bytes_per_s = 0

[[forward.classes]]
name = "defects"
priority = 10
always = true
[forward.classes.match]
annotation_class = ["crack"]

[[forward.windows]]
name = "morning"
days = "mon-sun"
start = "06:00"
end = "22:00"
bandwidth_bytes_per_s = {CAP}
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_outside_the_window_only_always_classes_move_then_the_rest_drains_at_the_cap(
    tmp_path: Path, cloud: FakeCloud
) -> None:
    settings = folder_settings(tmp_path, ADMIN, CONFIG, GATEWAY_CLOUD_URL=cloud.url)
    opens_at = datetime(2026, 12, 7, 6, 0, tzinfo=UTC).timestamp()  # the gateway's clock
    opens_mono = time.monotonic() + LEAD_S  # the same instant, on the fake cloud's clock
    shift = opens_at - (time.time() + LEAD_S)
    gw = Gateway(settings, clock=lambda: time.time() + shift)
    await gw.start()
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        async with anyio.create_task_group() as tg, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(settings, gw)), base_url="http://gw", timeout=30
        ) as client:
            gw.run_background(tg)
            keys = []
            for i in range(2):
                resp = await client.post("/api/admin/devices", json={"name": f"camera-{i}"}, headers=admin)
                assert resp.status_code == 201, resp.text
                data = resp.json()["data"]
                cloud.add_device(data["key"], device_id=data["device"]["device_id"])
                keys.append(data["key"])
            crack = {"annotations": [{"class_value": "crack", "type": "bbox", "geometry": [0.5, 0.5, 0.2, 0.2]}]}
            for i in range(ROUTINE + 3):
                meta = json.dumps(crack if i >= ROUTINE else {"source": "line-1"})
                resp = await client.post("/api/device/images/upload", headers={"X-Device-Key": keys[i % 2]},
                                         files={"image": (f"f{i}.jpg", jpeg_bytes(ROUTINE_BYTES + i), "image/jpeg")},
                                         data={"metadata": meta})
                assert resp.status_code == 201, resp.text

            await wait_for("the 3 defects", lambda: len(cloud.stored) >= 3)
            resp = await client.get("/api/admin/outbox", headers=admin)
            waiting = [r for r in resp.json()["data"] if r["state"] == "pending" and r["class"] == "default"]
            status = (await client.get("/api/admin/status", headers=admin)).json()["data"]["uplink"]["window"]
            page = (await client.get("/", headers=admin)).text
            await anyio.sleep(1.0)  # time for anything that should not go to go
            assert time.monotonic() < opens_mono - 1, "too slow to check before the window opened; raise LEAD_S"
            sent = {rec.filename for rec in cloud.stored.values()}
            assert sent == {f"f{i}.jpg" for i in range(ROUTINE, ROUTINE + 3)}  # only the always class moved
            assert len(waiting) == ROUTINE
            assert all(r["waits_for"] == {"window": "morning", "at": opens_at} for r in waiting)
            assert status["current"] is None and status["next_change_at"] == opens_at
            assert status["next_change"] == "morning opens"
            assert '<div class="value warn" data-figure="window">outside windows</div>' in page
            assert 'data-figure="window-next">morning opens<' in page
            assert '<tr data-class="default">' in page and "waits for morning" in page

            await wait_for("the routine frames", lambda: len(cloud.stored) == ROUTINE + 3, timeout=LEAD_S + 60)
            status = (await client.get("/api/admin/status", headers=admin)).json()["data"]["uplink"]["window"]
            tg.cancel_scope.cancel()
    finally:
        await gw.stop()
    assert status["current"] == "morning" and status["cap_bytes_per_s"] == CAP
    routine = sorted((a.at, a.size) for a in cloud.attempts if a.status == 201 and a.filename
                     and int(a.filename[1:-4]) < ROUTINE)
    first, last = routine[0][0], routine[-1][0]
    assert opens_mono - 0.05 <= first, "a routine frame went before the window opened"
    assert first - opens_mono < 3.0, f"the window's start did not wake the forwarder ({first - opens_mono:.1f} s)"
    # An arrival is counted when the body has been read: the paced bytes of every routine frame went
    # between the window's start and the last arrival.
    rate = sum(size for _, size in routine) / (last - opens_mono)
    print(f"window cap {CAP} B/s: measured {rate:.0f} B/s ({rate / CAP - 1:+.1%})")
    assert abs(rate / CAP - 1) <= 0.15
