"""The forward cache in a running gateway on the S3 store (SeaweedFS) with the fake cloud: pending
images go to the cloud from local copies, byte-identical, a bad or missing copy is replaced by the
store's bytes, and the cache never costs an upload its room on the disk."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import jpeg_bytes
from tests.integration.test_faults import MiB, fill, tmpfs
from tests.integration.test_forwarder import FAST_RETRIES, add_devices, digest, send_images
from tests.support.client import admin_status, stored_objects, upload, wait_for
from tests.support.client import metrics as all_metrics
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess, s3_env

CACHE = "acusight_gateway_forward_cache"


def metrics(gw: GatewayProcess) -> dict[str, float]:
    """The cache's own samples, by the rest of their names (`bytes`, `images`, `hits_total`...)."""
    return {series.removeprefix(CACHE + "_"): value for series, value in all_metrics(gw).items()
            if series.startswith(CACHE + "_")}


def cache_dir(gw: GatewayProcess) -> Path:
    return gw.workdir / "data" / "forward-cache"


def env(s3: Any, cloud: FakeCloud, **extra: str) -> dict[str, str]:
    return {**FAST_RETRIES, **s3_env(s3), "GATEWAY_CLOUD_URL": cloud.url, **extra}


def wait_cached(gw: GatewayProcess, count: int) -> None:
    wait_for(f"{count} cached", lambda: metrics(gw)["images"] == count)


def offline(gw: GatewayProcess) -> tuple[float, float]:
    """Wait until the forwarder has given up on the cloud (it then only probes, sending nothing);
    the cache's hits and misses (per attempt) so far."""
    wait_for("offline", lambda: admin_status(gw)["connectivity"] == "offline")
    now = metrics(gw)
    return now["hits_total"], now["misses_total"]


def used_since(gw: GatewayProcess, before: tuple[float, float]) -> tuple[float, float]:
    now = metrics(gw)
    return now["hits_total"] - before[0], now["misses_total"] - before[1]


def test_pending_images_go_from_the_cache_and_a_bad_copy_from_the_store(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud, s3: Any
) -> None:
    cloud.refuse_connections()
    gw = start_gateway(env(s3, cloud))
    devices = add_devices(gw, cloud, 2)
    order, metas = send_images(gw, devices, 20, size=40_000, metadata=lambda i: f'{{"seq": {i}}}'.encode())
    wait_cached(gw, 20)
    copies = {p.name: p.read_bytes() for p in cache_dir(gw).iterdir()}
    assert len(copies) == 20 and {digest(b) for b in copies.values()} == set(metas)
    assert metrics(gw)["bytes"] == sum(len(b) for b in copies.values())
    flipped, removed = sorted(copies)[:2]
    bad = bytearray(copies[flipped])
    bad[len(bad) // 2] ^= 0xFF
    (cache_dir(gw) / flipped).write_bytes(bytes(bad))  # same size, other bytes
    (cache_dir(gw) / removed).unlink()
    before = offline(gw)

    cloud.accept_connections()
    assert cloud.wait_until(lambda c: len(c.stored) == 20, timeout=60), cloud.stats()
    created = Counter(a.xxh3_hex for a in cloud.attempts if a.status == 201)
    assert set(created) == set(metas) and set(created.values()) == {1}  # the right bytes, once each
    arrivals = cloud.stats()["devices"]
    for device_id, _ in devices:
        assert arrivals[device_id] == order[device_id]
    for h, rec in cloud.stored.items():
        assert rec.metadata_raw == metas[h]
    wait_for("delivered", lambda: admin_status(gw)["delivered_count"] == 20)
    assert used_since(gw, before) == (18, 2)  # one attempt each once the cloud is back
    after = metrics(gw)
    assert after["images"] == 0 and after["bytes"] == 0 and list(cache_dir(gw).iterdir()) == []
    assert {digest(b) for b in stored_objects(gw).values()} == set(metas)  # the store keeps every image


def test_a_restart_starts_with_an_empty_cache_and_the_backlog_goes_from_the_store(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud, s3: Any
) -> None:
    cloud.refuse_connections()
    gw = start_gateway(env(s3, cloud))
    devices = add_devices(gw, cloud, 1)
    _, metas = send_images(gw, devices, 5, size=20_000)
    wait_cached(gw, 5)
    gw.kill()  # kill -9: the copies are left behind
    assert len(list(cache_dir(gw).iterdir())) == 5
    cloud.accept_connections()
    gw.start()
    assert cloud.wait_until(lambda c: len(c.stored) == 5, timeout=60), cloud.stats()
    assert set(cloud.stored) == set(metas)
    after = metrics(gw)
    assert (after["hits_total"], after["misses_total"]) == (0, 5) and after["images"] == 0
    assert list(cache_dir(gw).iterdir()) == []


def test_the_cap_bounds_the_cache_and_the_rest_goes_from_the_store(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud, s3: Any
) -> None:
    size = 10_000
    cloud.refuse_connections()
    gw = start_gateway(env(s3, cloud, GATEWAY_FORWARD_CACHE_BYTES=str(3 * size + 100)))
    devices = add_devices(gw, cloud, 1)
    _, metas = send_images(gw, devices, 8, size=size)  # 10,000 to 10,007 bytes: three fit
    wait_cached(gw, 3)
    time.sleep(0.5)
    assert metrics(gw)["images"] == 3 and len(list(cache_dir(gw).iterdir())) == 3
    before = offline(gw)
    cloud.accept_connections()
    assert cloud.wait_until(lambda c: len(c.stored) == 8, timeout=60), cloud.stats()
    assert set(cloud.stored) == set(metas)
    assert used_since(gw, before) == (3, 5)


def test_forwarding_from_folder_storage_keeps_no_cache(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud
) -> None:
    gw = start_gateway({**FAST_RETRIES, "GATEWAY_CLOUD_URL": cloud.url})
    devices = add_devices(gw, cloud, 1)
    send_images(gw, devices, 3)
    assert cloud.wait_until(lambda c: len(c.stored) == 3, timeout=30)
    assert not cache_dir(gw).exists() and metrics(gw) == {}


def test_a_nearly_full_disk_empties_the_cache_before_an_upload_is_refused(
    tmp_path: Path, cloud: FakeCloud, s3: Any
) -> None:
    """Data folder on a 48 MiB tmpfs with an 8 MiB floor: the cache fills what it may (it keeps
    16 MiB free); once other files leave less than the floor, the next upload empties the cache
    and is taken, where without the cache's room it would get 507."""
    floor, size = 8 * MiB, MiB
    work = tmp_path / "gw"
    cloud.refuse_connections()
    with tmpfs(work / "data", "48m"):
        gw = GatewayProcess(work, env(s3, cloud, GATEWAY_LIMITS_MIN_FREE_DISK_BYTES=str(floor))).start()
        try:
            [(_, key)] = add_devices(gw, cloud, 1)
            sent = []
            for _ in range(4):
                image = jpeg_bytes(size)
                assert upload(gw, key, image).status_code == 201
                sent.append(digest(image))
            wait_cached(gw, 4)
            fill(work / "data", leave=floor + size // 2)  # less than the floor once the next upload is counted
            image = jpeg_bytes(size)
            resp = upload(gw, key, image)
            assert resp.status_code == 201, resp.text
            sent.append(digest(image))
            assert metrics(gw)["images"] <= 1  # emptied (the new upload's copy may be kept)
            cloud.accept_connections()
            assert cloud.wait_until(lambda c: len(c.stored) == 5, timeout=60), cloud.stats()
            assert set(cloud.stored) == set(sent)
        finally:
            gw.stop()


def test_quarantined_uploads_keep_no_copy_and_go_from_the_store_once_released(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud, s3: Any
) -> None:
    key = "adk_" + "7" * 32  # unknown to the gateway; the cloud approves it once it answers
    cloud.add_device(key, device_id="cloud-cam")
    cloud.refuse_connections()
    gw = start_gateway(env(s3, cloud, GATEWAY_CLOUD_ACCEPT_UNKNOWN_KEYS_OFFLINE="true"))
    images = [jpeg_bytes(7000 + i) for i in range(3)]
    for image in images:
        assert upload(gw, key, image).status_code == 201
    assert admin_status(gw)["held_count"] == 3
    time.sleep(0.5)  # the cache's thread would have written by now
    assert metrics(gw)["images"] == 0 and list(cache_dir(gw).iterdir()) == []
    cloud.accept_connections()
    assert cloud.wait_until(lambda c: len(c.stored) == 3, timeout=60), cloud.stats()
    assert set(cloud.stored) == {digest(i) for i in images}
