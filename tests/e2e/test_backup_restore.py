"""`gateway backup` / `gateway restore` with real processes: a backup taken while the server runs,
the data folder and key secret wiped, the backup restored: the same devices (their keys still
work), images and pending outbox entries, which then reach the fake cloud."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import xxhash

from tests.conftest import jpeg_bytes
from tests.support.client import admin_status, upload
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e
ENV = {"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2",
       "GATEWAY_FORWARD_BACKOFF_MAX_S": "0.5"}


def test_backup_wipe_restore_keeps_devices_images_and_pending_entries(tmp_path: Path, cloud: FakeCloud) -> None:
    cloud.refuse_connections()  # the cloud is away: the uploads stay pending in the outbox
    gw = GatewayProcess(tmp_path / "gw", {**ENV, "GATEWAY_CLOUD_URL": cloud.url})
    data, secret = Path(gw.env["GATEWAY_DATA_DIR"]), Path(gw.env["GATEWAY_KEYS_SECRET_FILE"])
    backup, objects_copy = tmp_path / "backup", tmp_path / "objects-copy"
    gw.start()
    try:
        devices = [gw.add_device(f"cam-{i}") for i in range(2)]
        for device_id, key in devices:
            cloud.add_device(key, device_id=device_id)
        images = [jpeg_bytes(30_000 + i) for i in range(3)]
        for i, image in enumerate(images):
            assert upload(gw, devices[i % 2][1], image).status_code == 201
        before = admin_status(gw)
        assert before["backlog_count"] == 3 and before["delivered_count"] == 0

        out = gw.cli("backup", str(backup)).stdout  # through the running server's admin API
        assert f"backup written to {backup}" in out and "image bytes are not in this backup" in out
        manifest = json.loads((backup / "manifest.json").read_text())
        assert manifest["counts"] == {"devices": 2, "images": 3, "batches": manifest["counts"]["batches"],
                                      "outbox_pending": 3}
        assert {f["name"] for f in manifest["files"]} == {"catalog.duckdb", "gateway.key"}
        assert manifest["created_at"].endswith("+00:00")
        shutil.copytree(data / "objects", objects_copy)  # the object store apart, as docs/operations.md says

        again = gw.cli("backup", str(backup), check=False)  # never into a folder that holds files
        assert again.returncode == 1 and "not empty" in again.stderr
        live = gw.cli("restore", str(backup), check=False)  # never under a running server
        assert live.returncode == 2 and "stop it first" in live.stderr
    finally:
        assert gw.stop() == 0, gw.log_tail()

    offline = gw.cli("backup", str(tmp_path / "offline-backup")).stdout  # no server: the CLI on the files
    assert "no server running" in offline

    shutil.rmtree(data)
    secret.unlink()

    damaged = tmp_path / "damaged"
    shutil.copytree(backup, damaged)
    with (damaged / "catalog.duckdb").open("r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = gw.cli("restore", str(damaged), check=False)
    assert bad.returncode == 2 and "SHA-256" in bad.stderr, bad.stderr
    assert not data.exists() and not secret.exists()  # nothing was put in place

    restored = gw.cli("restore", str(backup))
    assert "2 device(s), 3 image(s), 3 pending" in restored.stdout, restored.stdout
    shutil.copytree(objects_copy, data / "objects")
    twice = gw.cli("restore", str(backup), check=False)  # the restored catalog is not overwritten unasked
    assert twice.returncode == 2 and "--force" in twice.stderr

    cloud.accept_connections()
    gw.start()
    try:
        deadline = time.monotonic() + 60
        while (status := admin_status(gw))["delivered_count"] < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status["delivered_count"] == 3 and status["backlog_count"] == 0, status
        assert status["devices"] == 2
        assert {xxhash.xxh3_128_hexdigest(i) for i in images} <= set(cloud.stored)
        for _, key in devices:  # the old keys still open the door
            assert upload(gw, key, jpeg_bytes(40_000 + len(key))).status_code in (200, 201)
    finally:
        assert gw.stop() == 0, gw.log_tail()


def test_forced_restore_moves_the_old_files_aside(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw", ENV)
    gw.start()
    try:
        gw.add_device("cam")
        gw.cli("backup", str(tmp_path / "b"))
        gw.add_device("cam-later")
    finally:
        gw.stop()
    out = gw.cli("restore", "--force", str(tmp_path / "b")).stdout
    assert "moved aside" in out and "1 device(s)" in out
    data = Path(gw.env["GATEWAY_DATA_DIR"])
    assert list(data.glob("catalog.duckdb.before-restore-*"))
