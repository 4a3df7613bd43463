"""The status page in-process: who may read it, the token cookie, and escaping of device-given text.

The app runs on ASGI with a chosen client address, so "not loopback" is tested without leaving
127.0.0.1 (no socket is opened at all).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from gateway.api.status_page import COOKIE, COOKIE_MAX_AGE_S, cookie_value
from gateway.app import create_app
from gateway.config import load_settings
from gateway.runtime import Gateway
from tests.conftest import png_bytes

TOKEN = "status-page-admin-token-42"
REMOTE = ("192.0.2.10", 50000)  # TEST-NET-1: never routed, only a label on the ASGI scope
LOCAL = ("127.0.0.1", 50000)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _gateway(tmp_path: Path, token: str = TOKEN, clock: Callable[[], float] | None = None,
                   **extra: str) -> Gateway:
    (tmp_path / "gateway.toml").write_text("")
    env = {"GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_KEYS_SECRET_FILE": str(tmp_path / "secret.key"),
           "GATEWAY_ADMIN_TOKEN": token, "GATEWAY_LIMITS_MIN_FREE_DISK_BYTES": "0", **extra}
    settings = load_settings(tmp_path / "gateway.toml", env=env)
    gw = Gateway(settings, clock) if clock is not None else Gateway(settings)
    await gw.start()
    return gw


def _client(gw: Gateway, client: tuple[str, int], host: str = "localhost:8080") -> httpx.AsyncClient:
    """`host`: what the browser puts in the Host header (the name it was given for the gateway)."""
    app = create_app(gw.settings, gw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url=f"http://{host}")


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    gateway = await _gateway(tmp_path)
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.mark.anyio
async def test_remote_needs_the_token_loopback_does_not(gw: Gateway) -> None:
    async with _client(gw, LOCAL) as local:
        resp = await local.get("/")
        assert resp.status_code == 200 and "Backlog" in resp.text
        assert resp.headers["content-type"].startswith("text/html")
        assert resp.headers["cache-control"] == "no-store"
    async with _client(gw, REMOTE) as remote:
        resp = await remote.get("/")
        assert resp.status_code == 401
        assert 'name="token"' in resp.text and "Backlog" not in resp.text
        assert (await remote.get("/", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"})).status_code == 401
        assert (await remote.get("/", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200
        assert (await remote.get("/", params={"token": "wrong"})).status_code == 401
        assert (await remote.get("/", cookies={COOKIE: "forged"})).status_code == 401


@pytest.mark.anyio
async def test_token_query_sets_an_httponly_cookie_and_drops_the_token_from_the_url(tmp_path: Path) -> None:
    now = 1_796_411_884.9  # a frozen clock: the cookie's issue second must not tick between the two reads
    gw = await _gateway(tmp_path, clock=lambda: now)
    try:
        await _check_token_query_sets_cookie(gw)
    finally:
        await gw.stop()


async def _check_token_query_sets_cookie(gw: Gateway) -> None:
    async with _client(gw, REMOTE) as remote:
        resp = await remote.get("/", params={"token": TOKEN})
        assert resp.status_code == 303 and resp.headers["location"] == "/"
        set_cookie = resp.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie.replace("Strict", "strict")
        assert TOKEN not in set_cookie, "the cookie holds an HMAC of the token, never the token"
        assert f"{COOKIE}={cookie_value(TOKEN, gw.services.clock())}" in set_cookie
        resp = await remote.get("/")  # the client kept the cookie
        assert resp.status_code == 200 and "Backlog" in resp.text
        # The cookie opens the page only, not the admin API.
        assert (await remote.get("/api/admin/status")).status_code == 401


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["rebound.example.com:8080", "rebound.example.com", "192.0.2.10:8080",
                                  "localhost.example.com", "127.0.0.1.example.com:8080"])
async def test_loopback_with_a_foreign_host_is_refused(gw: Gateway, host: str) -> None:
    """DNS rebinding: a page at rebound.example.com, whose name now resolves to 127.0.0.1, reads
    the page from the gateway PC's browser; its Host header still names rebound.example.com."""
    async with _client(gw, LOCAL, host=host) as rebound:
        resp = await rebound.get("/")
        assert resp.status_code == 401 and "Backlog" not in resp.text


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1:8080", "127.0.0.2", "[::1]:8080"])
async def test_loopback_with_a_loopback_host_is_trusted(gw: Gateway, host: str) -> None:
    async with _client(gw, LOCAL, host=host) as local:
        assert (await local.get("/")).status_code == 200


@pytest.mark.anyio
async def test_status_cookie_is_refused_by_the_server_after_7_days(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    gw = await _gateway(tmp_path, clock=lambda: now[0])
    try:
        async with _client(gw, REMOTE) as remote:
            assert (await remote.get("/", params={"token": TOKEN})).status_code == 303
            now[0] += 6 * 24 * 3600
            assert (await remote.get("/")).status_code == 200  # the kept cookie still opens it
            now[0] += 2 * 24 * 3600  # 8 days after issue: a browser that ignores Max-Age still sends it
            resp = await remote.get("/")
            assert resp.status_code == 401 and "Backlog" not in resp.text
        old = cookie_value(TOKEN, now[0] - COOKIE_MAX_AGE_S - 1)
        async with _client(gw, REMOTE) as remote:
            assert (await remote.get("/", cookies={COOKIE: old})).status_code == 401
            fresh = cookie_value(TOKEN, now[0] - 60)
            assert (await remote.get("/", cookies={COOKIE: fresh})).status_code == 200
            forged_time = old.replace(old.partition(".")[0], str(int(now[0])))  # newer time, old proof
            assert (await remote.get("/", cookies={COOKIE: forged_time})).status_code == 401
    finally:
        await gw.stop()


@pytest.mark.anyio
async def test_admin_api_off_means_loopback_only(tmp_path: Path) -> None:
    gw = await _gateway(tmp_path, token="")
    try:
        async with _client(gw, REMOTE) as remote:
            resp = await remote.get("/", params={"token": ""})
            assert resp.status_code == 401
            resp = await remote.get("/")
            assert resp.status_code == 403 and "only from the gateway PC" in resp.text
        async with _client(gw, LOCAL) as local:
            assert (await local.get("/")).status_code == 200
    finally:
        await gw.stop()


@pytest.mark.anyio
async def test_loopback_pass_can_be_turned_off(tmp_path: Path) -> None:
    """Where a proxy or a container port mapping makes every request look local."""
    gw = await _gateway(tmp_path, GATEWAY_ADMIN_LOOPBACK_STATUS_PAGE="false")
    try:
        async with _client(gw, LOCAL) as local:
            assert (await local.get("/")).status_code == 401
            assert (await local.get("/", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200
    finally:
        await gw.stop()


@pytest.mark.anyio
async def test_device_given_text_is_escaped_and_errors_are_listed_without_keys(gw: Gateway) -> None:
    device, key = await gw.services.registry.add('<img src=x onerror="alert(1)">', status="approved")
    async with _client(gw, LOCAL) as local:
        resp = await local.post("/api/device/images/upload", headers={"X-Device-Key": key},
                                files={"image": ('"><script>alert(2)</script>.png', png_bytes(b"1"), "image/png")})
        assert resp.status_code == 201
        bad_key = "adk_" + "9" * 32
        resp = await local.post("/api/device/images/upload", headers={"X-Device-Key": bad_key},
                                params={"token": TOKEN}, files={"image": ("x.png", png_bytes(b"2"), "image/png")})
        assert resp.status_code == 401
        assert (await local.get("/api/admin/status", params={"token": TOKEN})).status_code == 401
        page = (await local.get("/")).text
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert f'data-device-id="{device.device_id}"' in page
    assert "INVALID_DEVICE_KEY" in page and "POST /api/device/images/upload<" in page  # no query string kept
    assert "/api/admin/status" not in page  # the admin API's errors are the CLI's, not the devices' (issue 24)
    assert key not in page and bad_key not in page and TOKEN not in page
    assert re.search(r'data-figure="images">1<', page)
    assert re.search(r'data-figure="accepted-recent">1<', page)


@pytest.mark.anyio
async def test_page_stays_cheap_with_many_rows(gw: Gateway) -> None:
    """Recent uploads are capped at 20 rows whatever the catalog holds."""
    _, key = await gw.services.registry.add("cam-many", status="approved")
    async with _client(gw, LOCAL) as local:
        for i in range(25):
            resp = await local.post("/api/device/images/upload", headers={"X-Device-Key": key},
                                    files={"image": (f"f{i:02d}.png", png_bytes(bytes([i])), "image/png")})
            assert resp.status_code == 201
        page = (await local.get("/")).text
    section = page.split("<h2>Recent uploads</h2>")[1].split("<h2>")[0]
    assert section.count("<tr>") == 21  # heading row + 20
    assert "f24.png" in section and "f04.png" not in section
    await anyio.sleep(0)
