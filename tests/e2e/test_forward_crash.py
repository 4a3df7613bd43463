"""Forwarding across process deaths and with big images: real `gateway serve` processes and the fake cloud."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from tests.conftest import BACKENDS_AND_CLUSTER, jpeg_bytes
from tests.support.client import admin_status, multipart_head, raw_request, upload
from tests.support.fakecloud import UPLOAD_PATH, FakeCloud
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024
ENV = {
    "GATEWAY_STORAGE_BACKEND": "folder",
    "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2",
    "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0",
    "GATEWAY_FORWARD_CONCURRENCY": "4",
}


def wait_delivered(gw: GatewayProcess, count: int, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = admin_status(gw)
        if status["delivered_count"] == count and status["backlog_count"] == 0:
            return status
        time.sleep(0.1)
    raise AssertionError(f"not all delivered: {admin_status(gw)}")


@pytest.mark.parametrize("how", ["kill", "term"])
def test_process_death_while_the_cloud_stalls_loses_nothing_and_resends_little(
    tmp_path: Path, cloud: FakeCloud, how: str
) -> None:
    """SIGKILL (crash) or SIGTERM (graceful stop) with 4 uploads stuck at the cloud: after a restart
    everything arrives once; the cloud sees at most the in-flight uploads again, as 409s."""
    env = {**ENV, "GATEWAY_CLOUD_URL": cloud.url, "GATEWAY_CLOUD_TIMEOUT_S": "60"}
    gw = GatewayProcess(tmp_path / "gw", env).start()
    try:
        devices = []
        for i in range(4):
            device_id, key = gw.add_device(f"cam-{i}")
            cloud.add_device(key, device_id=device_id)
            devices.append((device_id, key))
        cloud.stall(seconds=None, n=None, path=UPLOAD_PATH)  # stored at the cloud, answer held back
        hashes = []
        for i in range(16):
            image = jpeg_bytes(20_000 + i)
            assert upload(gw, devices[i % 4][1], image).status_code == 201
            hashes.append(xxhash.xxh3_128_hexdigest(image))
        assert cloud.wait_until(lambda c: c.held == 4, timeout=20), cloud.stats()
        if how == "kill":
            gw.kill()
        else:
            gw.signal(signal.SIGTERM)
            assert gw.wait(30) == 0, gw.log_tail()
        cloud.release()
    finally:
        gw.stop()

    again = GatewayProcess(tmp_path / "gw", env).start()
    try:
        status = wait_delivered(again, 16)
        assert status["dead_count"] == 0
        assert set(cloud.stored) == set(hashes)
        created = Counter(a.xxh3_hex for a in cloud.attempts if a.status == 201)
        assert set(created.values()) == {1}
        resent = [a for a in cloud.attempts if a.status == 409]
        assert len(resent) <= 4, cloud.stats()  # bounded by what was in flight
        assert all(a.image_id for a in resent)  # the 409 carried the existing ids
        assert len(cloud.attempts) == 16 + len(resent)
    finally:
        assert again.stop() == 0, again.log_tail()


@pytest.mark.parametrize("backend", BACKENDS_AND_CLUSTER)
def test_a_40_mib_image_is_forwarded_in_bounded_memory(
    tmp_path: Path, cloud: FakeCloud, backend: str, backend_env: Callable[[str], dict[str, str]]
) -> None:
    env = {**ENV, **backend_env(backend), "GATEWAY_CLOUD_URL": cloud.url}
    gw = GatewayProcess(tmp_path / "gw", env).start()
    try:
        device_id, key = gw.add_device("big-camera")
        cloud.add_device(key, device_id=device_id)
        cloud.refuse_connections()  # store first, forward later: the forwarding alone is measured
        rss_at_start = gw.vm_rss_kib()
        size = 40 * MiB
        head, tail = multipart_head(f"{gw.url}/api/device/images/upload", key, "bigboundary", size)
        chunk = os.urandom(MiB)
        body = [b"\xff\xd8\xff\xe0" + chunk[4:], *([chunk] * 39), tail]
        status, _, raw = raw_request(f"{gw.url}/api/device/images/upload", head, iter(body))
        assert status == 201, raw
        assert admin_status(gw)["backlog_count"] == 1
        rss_before = gw.vm_rss_kib()
        ingest_growth_mib = (gw.vm_hwm_kib() - rss_at_start) / 1024  # reported, not this test's subject
        # Reset the peak (VmHWM) so that it measures the forwarding from here on.
        Path(f"/proc/{gw.proc.pid}/clear_refs").write_text("5")  # type: ignore[union-attr]
        cloud.accept_connections()
        wait_delivered(gw, 1)
        growth_mib = (gw.vm_hwm_kib() - rss_before) / 1024
        print(f"40 MiB ({backend}): RSS {rss_at_start / 1024:.0f} MiB at start, ingest peak +{ingest_growth_mib:.1f} "
              f"MiB; forward: RSS {rss_before / 1024:.0f} MiB before, peak +{growth_mib:.1f} MiB")
        [stored] = cloud.stored.values()
        assert stored.size == size
        expected = xxhash.xxh3_128()
        for piece in body[:-1]:
            expected.update(piece)
        assert stored.xxh3_hex == expected.hexdigest()
        assert growth_mib <= 64
    finally:
        assert gw.stop() == 0, gw.log_tail()
