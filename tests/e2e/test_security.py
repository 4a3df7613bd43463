"""Security rules a site relies on: the admin and sync APIs need their tokens (401 without or
with a wrong one, 403 while the API is off), and device keys never reach the logs, not even at
debug level and not on the error paths (unknown, revoked, refused by the cloud)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import jpeg_bytes
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import ADMIN_TOKEN, SYNC_TOKEN, GatewayProcess

pytestmark = pytest.mark.e2e

ADMIN_ROUTES = [("GET", "/api/admin/devices"), ("POST", "/api/admin/devices"), ("GET", "/api/admin/status"),
                ("POST", "/api/admin/verify"), ("GET", "/api/admin/batches"), ("POST", "/api/admin/devices/revoke")]
SYNC_ROUTES = [("GET", "/api/sync/batches"), ("GET", "/api/sync/images/img_x"),
               ("POST", "/api/sync/batches/batch_x/ack")]


def _code(resp: httpx.Response) -> tuple[int, str]:
    return resp.status_code, resp.json()["error"]["code"]


def test_admin_and_sync_apis_need_their_tokens(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "on", {"GATEWAY_STORAGE_BACKEND": "folder"}).start()
    off = GatewayProcess(tmp_path / "off", {"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_ADMIN_TOKEN": "",
                                            "GATEWAY_ADMIN_TOKEN_FILE": "", "GATEWAY_SYNC_TOKEN": ""}).start()
    try:
        for method, path in ADMIN_ROUTES:
            assert _code(httpx.request(method, gw.url + path, json={})) == (401, "UNAUTHORIZED"), path
            wrong = {"Authorization": "Bearer " + ADMIN_TOKEN[:-1] + "x"}
            assert _code(httpx.request(method, gw.url + path, json={}, headers=wrong)) == (401, "UNAUTHORIZED")
            sync_token = {"Authorization": f"Bearer {SYNC_TOKEN}"}  # the sync token is not an admin token
            assert _code(httpx.request(method, gw.url + path, json={}, headers=sync_token))[0] == 401
            basic = {"Authorization": f"Basic {ADMIN_TOKEN}"}
            assert _code(httpx.request(method, gw.url + path, json={}, headers=basic))[0] == 401
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            assert _code(httpx.request(method, off.url + path, json={}, headers=admin)) == (403, "FORBIDDEN")
        for method, path in SYNC_ROUTES:
            assert _code(httpx.request(method, gw.url + path)) == (401, "UNAUTHORIZED"), path
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # the admin token is not a sync token
            assert _code(httpx.request(method, gw.url + path, headers=admin))[0] == 401
            sync_token = {"Authorization": f"Bearer {SYNC_TOKEN}"}
            assert _code(httpx.request(method, off.url + path, headers=sync_token)) == (403, "FORBIDDEN")
        with gw.admin() as client:
            assert client.get("/api/admin/status").status_code == 200
    finally:
        gw.stop()
        off.stop()


def test_device_keys_never_reach_the_logs(tmp_path: Path) -> None:
    with FakeCloud() as cloud:
        gw = GatewayProcess(tmp_path / "gw", {
            "GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_LOG_LEVEL": "debug", "GATEWAY_CLOUD_URL": cloud.url,
            "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.1", "GATEWAY_FORWARD_BACKOFF_MAX_S": "0.5",
        }).start()
        try:
            _, good = gw.add_device("cam-good")
            _, refused = gw.add_device("cam-refused-by-cloud")
            _, revoked = gw.add_device("cam-revoked")
            cloud.add_device(good)
            cloud.set_key_status(refused, 401)  # the cloud refuses this key: dead letter, logged
            unknown = "adk_" + "0123456789abcdef" * 2
            with gw.admin() as client:
                client.post("/api/admin/devices/revoke", json={"ref": revoked}).raise_for_status()
            keys = [good, refused, revoked, unknown, "adk_not-even-a-key"]
            for k in keys:
                httpx.post(f"{gw.url}/api/device/images/upload", headers={"X-Device-Key": k},
                           files={"image": ("a.jpg", jpeg_bytes(3000), "image/jpeg")}, timeout=30)
                httpx.post(f"{gw.url}/api/device/checkin", headers={"X-Device-Key": k}, json={"status": "ok"})
                httpx.get(f"{gw.url}/api/device/self", headers={"X-Device-Key": k})
                httpx.post(f"{gw.url}/api/device/images/upload", headers={"X-Device-Key": k},
                           content=b"garbage", timeout=30)
            assert cloud.wait_until(lambda c: len(c.stored) >= 1 and len(c.attempts) >= 2, 20)
            time.sleep(1.0)  # let the forwarder log its dead letter
        finally:
            gw.stop()
    log = gw.log_path.read_text(errors="replace")
    assert len(log.splitlines()) > 20, "debug logging produced too little to be a fair test"
    for k in keys:
        assert k not in log, f"a device key was logged: {k[:8]}..."
        assert k[4:] not in log
