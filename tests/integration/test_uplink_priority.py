"""Priority classes end to end (docs/uplink.md): a real gateway process, the loopback fake cloud.

The cloud is down while 200 routine frames and then 5 defect frames arrive; when it comes back,
the defects reach it before any routine frame, and each device's frames keep their order within
their class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import jpeg_bytes
from tests.integration.test_forwarder import add_devices, digest, forwarding_gateway, metric, outbox_rows, send_images
from tests.support.client import admin_status, upload, wait_for
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess

CLASSES = """
[forward]
concurrency = 4

[[forward.classes]]
name = "defects"
priority = 10
[forward.classes.match]
annotation_class = ["scratch", "dent"]
min_confidence = 0.5
"""


def defect(i: int) -> bytes:
    ann = {"class_value": "scratch", "type": "bbox", "geometry": [0.5, 0.5, 0.1, 0.1], "confidence": 0.9}
    return json.dumps({"source": "line-1", "seq": i, "annotations": [ann]}).encode()


def test_defects_overtake_a_routine_backlog_when_the_cloud_comes_back(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud, tmp_path: Path
) -> None:
    cloud.refuse_connections()
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / "gateway.toml").write_text(CLASSES)  # start_gateway's process reads it
    gw = forwarding_gateway(start_gateway, cloud)
    devices = add_devices(gw, cloud, 3)

    routine, _ = send_images(gw, devices, 200,
                             metadata=lambda i: json.dumps({"source": "line-1", "seq": i}).encode())
    wait_for("offline", lambda: admin_status(gw)["connectivity"] == "offline", timeout=60)
    defects: dict[str, list[str]] = {device_id: [] for device_id, _ in devices}

    def send_defects(n: int) -> None:
        device_id, key = devices[n]
        for i in range(n, 5, len(devices)):
            image = jpeg_bytes(9000 + i)
            resp = upload(gw, key, image, filename=f"defect-{i}.jpg", metadata=defect(i))
            assert resp.status_code == 201, resp.text
            defects[device_id].append(digest(image))

    with ThreadPoolExecutor(len(devices)) as pool:
        for done in [pool.submit(send_defects, n) for n in range(len(devices))]:
            done.result()

    # Recorded per image, counted per class, shown per class.
    rows = outbox_rows(gw)
    assert sorted(r["class"] for r in rows) == ["default"] * 200 + ["defects"] * 5
    assert all(r["waits_for"] is None for r in rows)  # no windows: nothing waits for one
    assert metric(gw, 'acusight_gateway_class_backlog_images{class="defects"}') == 5
    assert metric(gw, 'acusight_gateway_class_backlog_images{class="default"}') == 200
    assert metric(gw, 'acusight_gateway_class_oldest_pending_age_seconds{class="default"}') > 0
    by_class = {c["name"]: c for c in admin_status(gw)["uplink"]["classes"]}
    assert by_class["defects"]["pending_count"] == 5 and by_class["defects"]["priority"] == 10
    assert "defects" in gw.cli("outbox", "list", "--limit", "300").stdout

    cloud.accept_connections()
    assert cloud.wait_until(lambda c: len(c.stored) == 205, timeout=120), cloud.stats()

    arrivals = [a for a in cloud.attempts if a.status == 201]
    defect_hashes = {h for hs in defects.values() for h in hs}
    positions = [i for i, a in enumerate(arrivals) if a.xxh3_hex in defect_hashes]
    assert positions == list(range(5)), [(a.device_id, a.xxh3_hex in defect_hashes) for a in arrivals[:12]]
    for device_id, _ in devices:  # each device's order within each class
        mine = [a.xxh3_hex for a in arrivals if a.device_id == device_id]
        assert [h for h in mine if h in defect_hashes] == defects[device_id]
        assert [h for h in mine if h not in defect_hashes] == routine[device_id]
    status = wait_for("delivered", lambda: (s := admin_status(gw))["delivered_count"] == 205 and s)
    assert all(c["pending_count"] == 0 for c in status["uplink"]["classes"])
