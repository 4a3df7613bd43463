"""What the gateway leaves on disk and stores for check-ins (issue 23, item 14): the data folder is
the owner's only (folders 0700, files 0600, umask set at `serve`), check-in metrics over their limit
are refused rather than cut into invalid JSON, and the spool folder's own entry is fsynced."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest

from gateway.config import load_settings
from gateway.runtime import Gateway
from tests.conftest import BACKENDS, jpeg_bytes
from tests.support.client import upload
from tests.support.gateway_proc import GatewayProcess

MAX_METRICS_BYTES = 65536  # gateway.devices.registry.MAX_METRICS_BYTES


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_data_folder_and_files_are_the_owners_only(
    backend: str, start_gateway: Callable[..., GatewayProcess], backend_env: Callable[[str], dict[str, str]],
) -> None:
    gw = start_gateway(backend_env(backend))
    _, key = gw.add_device("camera")
    for i in range(3):
        assert upload(gw, key, jpeg_bytes(4000 + i)).status_code == 201
    httpx.post(f"{gw.url}/api/device/checkin", json={"status": "ok"}, headers={"X-Device-Key": key})
    gw.stop()  # the catalog is flushed and closed: every file it writes exists now
    data = gw.workdir / "data"
    found = {p: stat.S_IMODE(p.stat().st_mode) for p in [data, *data.rglob("*")]}
    assert len([p for p in found if p.is_file()]) >= 2  # at least the catalog and its journal
    if backend == "folder":
        assert any("raw-data" in str(p) and p.is_file() for p in found), "the objects are there too"
    loose = {str(p.relative_to(gw.workdir)): oct(mode) for p, mode in found.items() if mode & 0o077}
    assert not loose, f"readable by others: {loose}"


@pytest.mark.e2e
def test_checkin_metrics_over_the_limit_are_refused_not_cut(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})
    _, key = gw.add_device("camera")
    big = {"log": "x" * (MAX_METRICS_BYTES + 100)}
    resp = httpx.post(f"{gw.url}/api/device/checkin", json={"status": "ok", "metrics": big},
                      headers={"X-Device-Key": key})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert "metrics" in resp.json()["error"]["message"].lower()
    fits = {"log": "x" * (MAX_METRICS_BYTES - 20)}
    resp = httpx.post(f"{gw.url}/api/device/checkin", json={"status": "ok", "metrics": fits},
                      headers={"X-Device-Key": key})
    assert resp.status_code == 200


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_spool_folder_entry_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gateway.toml").write_text("")
    env = {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_KEYS_SECRET_FILE": str(tmp_path / "secret.key"),
           "GATEWAY_LIMITS_MIN_FREE_DISK_BYTES": "0", "GATEWAY_STORAGE_BACKEND": "folder"}
    gw = Gateway(load_settings(tmp_path / "gateway.toml", env=env))
    data, spool = tmp_path / "data", tmp_path / "data" / "spool"
    synced_after_spool: list[bool] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if data.exists() and stat.S_ISDIR(st.st_mode) and st.st_ino == data.stat().st_ino:
            synced_after_spool.append(spool.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    await gw.start()
    try:
        assert spool.is_dir()
        assert any(synced_after_spool), "the data folder was not fsynced after the spool folder was made"
    finally:
        await gw.stop()
    await anyio.sleep(0)
