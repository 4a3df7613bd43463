"""Every request to the cloud goes through the same proxy, a real one (Debian's tinyproxy), whose
own log must show each: the upload, the probes, the key check and the check-in relay. The proxy
comes from `[cloud] proxy` when set (it overrides the environment; "direct": none), else from
HTTP_PROXY / NO_PROXY. The local S3 store is always reached directly.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MinioSettings, load_settings
from gateway.forward.client import DELIVERED, CloudClient, MultipartUpload
from gateway.outbound import Outbound
from gateway.runtime import Gateway
from gateway.storage.s3 import S3Store
from tests.conftest import jpeg_bytes
from tests.support.tinyproxy import TinyProxy

PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
              "all_proxy")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    tp = TinyProxy(tmp_path_factory.mktemp("tinyproxy")).start()
    try:
        yield tp
    finally:
        tp.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def dead_proxy() -> str:
    with socket.socket() as s:  # a port nobody listens on: a request sent there fails
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def every_call(cloud: Any, proxy_setting: str) -> list[str]:
    """Upload, key check, check-in relay and both probes through a cloud client made as the
    runtime makes it; the paths the cloud saw."""
    key = "adk_" + secrets.token_hex(16)
    cloud.add_device(key)
    http = Outbound()
    client = CloudClient(http, cloud.url, 10.0, 60.0, proxy_setting)
    image = jpeg_bytes(50_000)

    async def main() -> None:
        try:
            out = await client.upload(key, MultipartUpload("p.jpg", "image/jpeg", len(image), None), image)
            assert out.kind == DELIVERED, out
            assert (await client.device_self(key)).status == 200
            assert await client.checkin(key, b'{"status": "ok"}', 5.0) == []
            assert await client.probe(key) and await client.probe(None)
        finally:
            await http.aclose()

    asyncio.run(main())
    return ["/api/device/images/upload", "/api/device/self", "/api/device/checkin"]


def relayed(proxy: TinyProxy, before: int, cloud: Any) -> list[str]:
    return [line for line in proxy.requests()[before:] if f"127.0.0.1:{cloud.port}/" in line]


def test_the_environment_proxy_carries_every_cloud_request(proxy: TinyProxy, cloud: Any,
                                                           clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", proxy.url)
    before = len(proxy.requests())
    every_call(cloud, "")
    lines = relayed(proxy, before, cloud)
    base = f"http://127.0.0.1:{cloud.port}/api"
    assert f"POST {base}/device/images/upload HTTP/1.1" in lines, proxy.log()[-2000:]
    assert lines.count(f"GET {base}/device/self HTTP/1.1") == 2  # the key check and the keyed probe
    assert f"POST {base}/device/checkin HTTP/1.1" in lines
    assert f"HEAD {base} HTTP/1.1" in lines  # the probe without a key


def test_the_setting_overrides_the_environment(proxy: TinyProxy, cloud: Any, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", dead_proxy())  # would fail every request
    before = len(proxy.requests())
    every_call(cloud, proxy.url)
    assert len(relayed(proxy, before, cloud)) == 5
    before = len(proxy.requests())
    clean_env.setenv("HTTP_PROXY", proxy.url)
    every_call(cloud, "direct")  # none at all, whatever the environment says
    assert relayed(proxy, before, cloud) == []


def test_no_proxy_exempts_the_cloud(proxy: TinyProxy, cloud: Any, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", proxy.url)
    clean_env.setenv("NO_PROXY", "localhost,127.0.0.1")
    before = len(proxy.requests())
    every_call(cloud, "")
    assert relayed(proxy, before, cloud) == []


def test_the_local_s3_store_is_reached_directly(proxy: TinyProxy, s3: Any, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HTTP_PROXY", proxy.url)
    store = S3Store(MinioSettings(endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                                  bucket=f"proxy-{secrets.token_hex(4)}"))
    store.ensure_ready()
    before = len(proxy.requests())

    async def main() -> None:
        await store.put_bytes_async("raw-data/direct.jpg", b"direct", "image/jpeg")
        assert b"".join([c async for c in await store.read_async("raw-data/direct.jpg")]) == b"direct"
        await store.http.aclose()

    asyncio.run(main())
    assert proxy.requests()[before:] == []


def test_the_runtime_gives_its_cloud_client_the_settings_proxy(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    (tmp_path / "g.toml").write_text("")
    settings = load_settings(tmp_path / "g.toml", env={
        "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_STORAGE_BACKEND": "folder",
        "GATEWAY_CLOUD_URL": "http://cloud.example/api", "GATEWAY_CLOUD_PROXY": "http://proxy.example:3128"})
    gw = Gateway(settings)

    async def main() -> None:
        await gw.start()
        try:
            cloud = gw.services.cloud
            assert cloud is not None and cloud.proxy == "http://proxy.example:3128"
            assert cloud.http is gw.services.http  # one client, shared with the store
        finally:
            await gw.stop()

    asyncio.run(main())


@pytest.mark.e2e
def test_a_running_gateway_sends_every_cloud_request_through_the_proxy(proxy: TinyProxy, cloud: Any, s3: Any,
                                                                       tmp_path: Path) -> None:
    """A gateway process with HTTP_PROXY set: the key check of an unknown key, the forwarded
    upload and the check-in relay all appear in tinyproxy's log; its S3 store's requests do not."""
    import httpx

    from tests.support.gateway_proc import GatewayProcess, s3_env

    env = s3_env(s3) | {"GATEWAY_CLOUD_URL": cloud.url, "HTTP_PROXY": proxy.url, "http_proxy": proxy.url}
    gw = GatewayProcess(tmp_path / "gw", env)
    for name in PROXY_VARS:  # only HTTP_PROXY: no NO_PROXY from the machine exempts loopback
        if name.lower() != "http_proxy":
            gw.env.pop(name, None)
    key = "adk_" + secrets.token_hex(16)
    cloud.add_device(key)  # known to the cloud only: the gateway asks about it
    before = len(proxy.requests())
    gw.start()
    try:
        image = jpeg_bytes(30_000)
        resp = httpx.post(f"{gw.url}/api/device/images/upload", headers={"X-Device-Key": key},
                          files={"image": ("px.jpg", image, "image/jpeg")}, timeout=30)
        assert resp.status_code == 201, resp.text
        resp = httpx.post(f"{gw.url}/api/device/checkin", headers={"X-Device-Key": key},
                          json={"status": "ok"}, timeout=30)
        assert resp.status_code == 200, resp.text
        deadline = time.monotonic() + 30
        while not any(r.device_key == key for r in cloud.stored.values()):
            assert time.monotonic() < deadline, gw.log_tail()
            time.sleep(0.1)
    finally:
        gw.stop()
    lines = proxy.requests()[before:]
    base = f"http://127.0.0.1:{cloud.port}/api"
    assert f"GET {base}/device/self HTTP/1.1" in lines, lines
    assert f"POST {base}/device/images/upload HTTP/1.1" in lines, lines
    assert f"POST {base}/device/checkin HTTP/1.1" in lines, lines
    assert not [line for line in lines if s3.endpoint in line], "the S3 store is reached directly"
