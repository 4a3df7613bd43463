"""The rest of an agent's calls (SPEC §2) over real HTTP on a running gateway: the heartbeat
`POST /api/core/agent/checkin` (recorded, relayed to the fake cloud, answered without the envelope)
and the older `/api/core/device/...` paths, which must answer byte-for-byte like `/api/device/...`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import jpeg_bytes
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess

HEARTBEAT = "/api/core/agent/checkin"
BEAT = {"device_id": "cam-01", "current_model_id": "defect-v3", "ip_address": "192.168.10.41",
        "pending_requests": [{"type": "model_download", "payload": {"model_id": "defect-v4"}}], "status": "online"}


def beat(gw: GatewayProcess, key: str | None, body: bytes | Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"X-Device-Key": key} if key else {})
    return httpx.post(f"{gw.url}{HEARTBEAT}", content=content, headers=headers, timeout=30, **kw)


def listed(gw: GatewayProcess, device_id: str) -> dict[str, Any]:
    """The device as `gateway devices list --json` shows it (the same admin API, without a CLI process)."""
    with gw.admin() as client:
        devices = client.get("/api/admin/devices").json()["data"]
    return next(d for d in devices if d["device_id"] == device_id)  # type: ignore[no-any-return]


def test_heartbeat_is_recorded_relayed_and_answered_without_the_envelope(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud
) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_CLOUD_URL": cloud.url,
                        "GATEWAY_CLOUD_TIMEOUT_S": "5"})
    device_id, key = gw.add_device("line-3 camera")
    cloud.add_device(key, device_id=device_id)
    cloud.pending_actions = [{"type": "update_model", "payload": {"model_id": "defect-v4"}}]
    body = json.dumps(BEAT).encode()

    resp = beat(gw, key, body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.content == (b'{"pending_actions":[{"type":"update_model","payload":{"model_id":"defect-v4"}}],'
                            b'"success":true}')
    assert [(h.device_id, h.body) for h in cloud.heartbeats] == [(device_id, body)]  # relayed as received

    d = listed(gw, device_id)
    assert (d["last_status"], d["last_model_id"], d["last_ip"]) == ("online", "defect-v3", "192.168.10.41")
    assert d["pending_requests"] == BEAT["pending_requests"]
    table = gw.cli("devices", "list").stdout
    assert "defect-v3" in table and "192.168.10.41" in table
    page = httpx.get(f"{gw.url}/", timeout=30).text  # loopback reads the status page without a token
    assert 'data-figure="device-model">defect-v3<' in page and 'data-figure="device-ip">192.168.10.41<' in page
    assert 'data-figure="device-pending-requests">1<' in page

    cloud.refuse_connections()  # offline: recorded here, no actions
    resp = beat(gw, key, {"device_id": "cam-01", "status": "degraded", "pending_requests": []})
    assert resp.status_code == 200 and resp.content == b'{"pending_actions":[],"success":true}'
    d = listed(gw, device_id)
    assert d["last_status"] == "degraded" and d["pending_requests"] == []


@pytest.fixture
def local_gw(start_gateway: Callable[..., GatewayProcess]) -> Iterator[GatewayProcess]:
    yield start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})


def test_heartbeat_refusals_use_the_envelope_and_change_nothing(local_gw: GatewayProcess) -> None:
    gw = local_gw
    device_id, key = gw.add_device("cam")
    pending_id, pending_key = gw.add_device("new cam", status="pending")
    rejected_id, rejected_key = gw.add_device("bad cam")
    with gw.admin() as client:
        client.post("/api/admin/devices/reject", json={"ref": rejected_id}).raise_for_status()

    def error(resp: httpx.Response) -> tuple[int, str]:
        envelope = resp.json()
        assert envelope["success"] is False and isinstance(envelope["error"]["details"], str), envelope
        return resp.status_code, envelope["error"]["code"]

    assert error(beat(gw, None, BEAT)) == (401, "UNAUTHORIZED")
    assert error(beat(gw, "adk_" + "0" * 32, BEAT)) == (401, "INVALID_DEVICE_KEY")
    assert error(beat(gw, rejected_key, BEAT)) == (403, "DEVICE_NOT_APPROVED")
    for bad in (b"{", b"[]", b'{"status": "ok"}', b'{"device_id": ""}', b'{"device_id": 7}',
                b'{"device_id": "x", "pending_requests": [{"payload": {}}]}',
                b'{"device_id": "x", "pending_requests": [{"type": "a", "payload": []}]}',
                b'{"device_id": "x", "pending_requests": {}}', b"[" * 100_000):
        assert error(beat(gw, key, bad)) == (400, "VALIDATION_ERROR"), bad
    big = json.dumps({"device_id": "x", "status": "a" * (1024 * 1024)}).encode()
    assert error(beat(gw, key, big)) == (413, "PAYLOAD_TOO_LARGE")  # declared too long

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while the body streams in
        yield b'{"device_id": "x", "status": "'
        for _ in range(40):
            yield b"a" * 65536

    resp = httpx.post(f"{gw.url}{HEARTBEAT}", content=chunked(), timeout=30,
                      headers={"X-Device-Key": key, "Content-Type": "application/json"})
    assert error(resp) == (413, "PAYLOAD_TOO_LARGE")
    assert listed(gw, device_id)["last_seen_at"] is None  # nothing recorded by any of these

    resp = beat(gw, pending_key, {"device_id": pending_id, "ip_address": "10.0.0.9"})  # pending devices may
    assert resp.status_code == 200 and resp.json() == {"pending_actions": [], "success": True}
    assert listed(gw, pending_id)["last_ip"] == "10.0.0.9"
    assert httpx.get(f"{gw.url}/api/health", timeout=10).status_code == 200


def _same(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.headers["content-type"], a.content) == (b.status_code, b.headers["content-type"],
                                                                     b.content)


def test_core_paths_answer_byte_for_byte_like_the_device_paths(local_gw: GatewayProcess) -> None:
    gw = local_gw
    _, key = gw.add_device("cam")
    _, pending_key = gw.add_device("new cam", status="pending")
    h = {"X-Device-Key": key}
    for k in (key, pending_key, "adk_" + "1" * 32, ""):
        hk = {"X-Device-Key": k} if k else {}
        _same(httpx.get(f"{gw.url}/api/device/self", headers=hk), httpx.get(f"{gw.url}/api/core/device/self",
                                                                            headers=hk))
    body = b'{"status": "ok", "metrics": {"temp_c": 40.5}}'
    for raw in (body, b"{", b'{"metrics": 5}'):
        _same(httpx.post(f"{gw.url}/api/device/checkin", content=raw, headers=h),
              httpx.post(f"{gw.url}/api/core/device/checkin", content=raw, headers=h))

    def up(path: str, image: bytes | None, k: str | None = key, **kw: Any) -> httpx.Response:
        files = {"image": ("frame.jpg", image, "image/jpeg")} if image is not None else None
        data = None if image is not None else {"metadata": "{}"}
        return httpx.post(f"{gw.url}{path}", files=files, data=data, headers={"X-Device-Key": k} if k else {},
                          timeout=30, **kw)

    image = jpeg_bytes(5000)
    first = up("/api/core/device/images/upload", image)
    assert first.status_code == 201 and set(first.json()["data"]) == {"image_id", "batch_id", "storage_key"}
    _same(up("/api/device/images/upload", image), up("/api/core/device/images/upload", image))  # 409, same ids
    assert up("/api/device/images/upload", image).json()["data"] == first.json()["data"]
    _same(up("/api/device/images/upload", image, k=None), up("/api/core/device/images/upload", image, k=None))
    _same(up("/api/device/images/upload", b"GIF89a" + b"\0" * 100),
          up("/api/core/device/images/upload", b"GIF89a" + b"\0" * 100))

    paths = httpx.get(f"{gw.url}/schema/openapi.json", timeout=30).json()["paths"]
    for path in ("/api/core/device/self", "/api/core/device/checkin", "/api/core/device/images/upload",
                 "/api/core/agent/checkin", "/api/devices/provision", "/api/core/devices/provision"):
        assert path in paths, sorted(paths)
