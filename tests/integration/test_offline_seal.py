"""`gateway batches seal` on a stopped server's files (the CLI's offline path, in-process over ASGI).

The seal route's services exist from construction, so sealing works without a started server; the
batch moves on (manifest, drainable) at the next start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.runtime import Gateway
from tests.conftest import jpeg_bytes

ADMIN = "offline-seal-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _settings(tmp_path: Path) -> Settings:
    (tmp_path / "gateway.toml").write_text("")
    return load_settings(tmp_path / "gateway.toml", env={
        "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_KEYS_SECRET_FILE": str(tmp_path / "secret.key"),
        "GATEWAY_ADMIN_TOKEN": ADMIN, "GATEWAY_LIMITS_MIN_FREE_DISK_BYTES": "0",
        "GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_BATCHES_TIMEOUT_S": "3600"})


def _client(settings: Settings, gw: Gateway, offline: bool = False) -> httpx.AsyncClient:
    app = create_app(settings, gw, offline=offline)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30)


async def _batch(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    resp = await client.get(f"/api/admin/batches/{batch_id}", headers=AUTH)
    assert resp.status_code == 200, resp.text
    batch: dict[str, Any] = resp.json()["data"]["batch"]
    return batch


@pytest.mark.anyio
async def test_a_batch_sealed_on_a_stopped_server_moves_on_at_the_next_start(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    gw = Gateway(settings)
    await gw.start()
    try:
        async with _client(settings, gw) as client:
            resp = await client.post("/api/admin/devices", json={"name": "cam"}, headers=AUTH)
            key = resp.json()["data"]["key"]
            resp = await client.post("/api/device/images/upload", headers={"X-Device-Key": key},
                                     files={"image": ("a.jpg", jpeg_bytes(2000), "image/jpeg")})
            assert resp.status_code == 201, resp.text
            batch_id = resp.json()["data"]["batch_id"]
    finally:
        await gw.stop()

    offline = Gateway(settings)
    await offline.open_catalog()
    try:
        async with _client(settings, offline, offline=True) as client:
            resp = await client.post(f"/api/admin/batches/{batch_id}/seal")
            assert resp.status_code == 200, resp.text
            assert resp.json()["data"]["sealed_now"] is True
            assert (await _batch(client, batch_id))["state"] == "sealed"
    finally:
        await offline.stop()

    again = Gateway(settings)
    await again.start()
    try:
        async with anyio.create_task_group() as tg, _client(settings, again) as client:
            again.run_background(tg)
            with anyio.fail_after(20):
                while (batch := await _batch(client, batch_id))["state"] != "forwarded" or not batch["manifest_at"]:
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
    finally:
        await again.stop()
