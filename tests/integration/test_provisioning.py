"""Provisioning on the LAN (`POST /api/devices/provision`, SPEC §2) over real HTTP on a running
gateway: local tokens made with `gateway tokens`, and relaying to the fake cloud."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import jpeg_bytes
from tests.support.client import upload
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess

TOKEN = re.compile(r"apt_[0-9a-f]{32}")


def provision(gw: GatewayProcess, token: str, device_id: str, path: str = "/api/devices/provision",
              **info: Any) -> httpx.Response:
    body = {"token": token, "device_info": {"device_id": device_id, **info}}
    return httpx.post(f"{gw.url}{path}", json=body, timeout=30)


def error(resp: httpx.Response) -> tuple[int, str]:
    envelope = resp.json()
    assert envelope["success"] is False and isinstance(envelope["error"]["details"], str), envelope
    return resp.status_code, envelope["error"]["code"]


def create_token(gw: GatewayProcess, *args: str) -> tuple[str, str]:
    """`gateway tokens create` through the CLI; returns (token id, token)."""
    out = gw.cli("tokens", "create", *args).stdout
    token = TOKEN.search(out)
    token_id = re.search(r"tok_[0-9a-f]+", out)
    assert token and token_id, out
    assert "device setup: curl" in out and f"{token.group()}" in out.split("device setup:")[1]
    return token_id.group(), token.group()


def devices(gw: GatewayProcess) -> dict[str, dict[str, Any]]:
    with gw.admin() as client:
        return {d["device_id"]: d for d in client.get("/api/admin/devices").json()["data"]}


def test_local_provisioning_from_token_to_upload(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder",
                        "GATEWAY_PROVISIONING_REQUESTS_PER_MINUTE_PER_CLIENT": "1000"})
    single_id, single = create_token(gw, "line 3 camera", "--single-use")
    resp = provision(gw, single, "cam-01", name="Line 3 camera", agent_version="2.4.1", serial="SN-77")
    assert resp.status_code == 201, resp.text
    data = resp.json()["data"]
    assert set(data) == {"device_id", "endpoint_id", "api_key", "api_endpoint"}
    assert data["device_id"] == data["endpoint_id"] == "cam-01"
    assert re.fullmatch(r"adk_[0-9a-f]{32}", data["api_key"])
    assert data["api_endpoint"] == f"{gw.url}/api"  # server.external_url
    key = data["api_key"]

    cam = devices(gw)["cam-01"]
    assert (cam["name"], cam["status"], cam["origin"]) == ("Line 3 camera", "pending", "local")
    assert cam["device_info"] == {"device_id": "cam-01", "name": "Line 3 camera", "agent_version": "2.4.1",
                                  "serial": "SN-77"}  # extra fields kept
    assert error(upload(gw, key, jpeg_bytes(3000))) == (403, "DEVICE_NOT_APPROVED")
    gw.cli("devices", "approve", "cam-01")
    assert upload(gw, key, jpeg_bytes(3000)).status_code == 201

    # The single-use token is spent; nothing is registered by a refusal.
    assert error(provision(gw, single, "cam-02")) == (401, "INVALID_TOKEN")
    # An expired token (valid for about a second).
    _, short = create_token(gw, "short", "--expires-in-days", "0.00001")
    time.sleep(1.2)
    assert error(provision(gw, short, "cam-02")) == (401, "TOKEN_EXPIRED")
    # A reusable token: a second device, then the first device's id again.
    multi_id, multi = create_token(gw, "whole line", "--never-expires")
    assert provision(gw, multi, "cam-03", path="/api/core/devices/provision").status_code == 201
    assert error(provision(gw, multi, "cam-01")) == (409, "DEVICE_EXISTS")
    gw.cli("tokens", "revoke", multi_id)
    assert error(provision(gw, multi, "cam-04")) == (401, "INVALID_TOKEN")
    # Unknown and malformed tokens, and bad bodies.
    assert error(provision(gw, "apt_" + secrets.token_hex(16), "cam-05")) == (401, "INVALID_TOKEN")
    assert error(provision(gw, "not-a-token", "cam-05")) == (401, "INVALID_TOKEN")
    for bad in (b"{", b"[]", b'{"token": "apt_x"}', b'{"token": 5, "device_info": {"device_id": "a"}}',
                json.dumps({"token": multi, "device_info": {"name": "no id"}}).encode(),
                json.dumps({"token": multi, "device_info": {"device_id": "../etc"}}).encode(),
                json.dumps({"token": multi, "device_info": {"device_id": "a", "pad": "x" * 20000}}).encode()):
        resp = httpx.post(f"{gw.url}/api/devices/provision", content=bad, timeout=30)
        assert error(resp) == (400, "VALIDATION_ERROR"), bad
    assert sorted(devices(gw)) == ["cam-01", "cam-03"]

    listing = gw.cli("tokens", "list", "--json").stdout
    assert "apt_" not in listing and "hash" not in listing  # never the token
    tokens = {t["token_id"]: t for t in json.loads(listing)}
    assert (tokens[single_id]["use_count"], tokens[single_id]["single_use"]) == (1, True)
    assert tokens[multi_id]["use_count"] == 1 and tokens[multi_id]["revoked_at"] is not None
    assert tokens[multi_id]["expires_at"] is None and tokens[single_id]["last_used_at"] is not None
    table = gw.cli("tokens", "list").stdout
    assert "apt_" not in table and "whole line" in table

    # The same commands on a stopped server's files, and the token works once it runs again.
    gw.stop()
    assert single_id in gw.cli("tokens", "list").stdout
    _, offline = create_token(gw, "made offline", "--single-use")
    gw.start()
    assert provision(gw, offline, "cam-06").status_code == 201


def test_provisioning_is_rate_limited_per_client(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder",
                        "GATEWAY_PROVISIONING_REQUESTS_PER_MINUTE_PER_CLIENT": "3"})
    wrong = "apt_" + "0" * 32
    assert [provision(gw, wrong, "x").status_code for _ in range(3)] == [401, 401, 401]
    resp = provision(gw, wrong, "x")
    assert error(resp) == (429, "RATE_LIMITED") and int(resp.headers["retry-after"]) >= 1
    # Admin token routes: created through the admin API too, with the same rules.
    with gw.admin() as client:
        made = client.post("/api/admin/tokens", json={"name": "api", "single_use": True, "expires_in_days": 1})
        assert made.status_code == 201 and TOKEN.fullmatch(made.json()["data"]["value"])
        bad = client.post("/api/admin/tokens", json={"name": "api", "never_expires": True, "expires_in_days": 1})
        assert error(bad) == (400, "VALIDATION_ERROR")
        assert error(client.post("/api/admin/tokens/revoke", json={"ref": "tok_nope"})) == (404, "NOT_FOUND")
    assert error(httpx.get(f"{gw.url}/api/admin/tokens")) == (401, "UNAUTHORIZED")


def relay_gateway(start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud) -> GatewayProcess:
    return start_gateway({"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_CLOUD_URL": cloud.url,
                          "GATEWAY_CLOUD_TIMEOUT_S": "5", "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2",
                          "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0",
                          "GATEWAY_PROVISIONING_REQUESTS_PER_MINUTE_PER_CLIENT": "1000"})  # type: ignore[no-any-return]


def test_relay_provisioning_through_the_cloud(start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud) -> None:
    gw = relay_gateway(start_gateway, cloud)
    token, pending_token = "apt_" + secrets.token_hex(16), "apt_" + secrets.token_hex(16)
    cloud.add_provisioning_token(token, status="approved")
    cloud.add_provisioning_token(pending_token, status="pending")

    resp = provision(gw, token, "cam-01", name="Line 3 camera", agent_version="2.4.1")
    assert resp.status_code == 201, resp.text
    data = resp.json()["data"]
    [made] = cloud.provisioned
    assert json.loads(made.body) == {"token": token, "device_info": {"device_id": "cam-01", "name": "Line 3 camera",
                                                                      "agent_version": "2.4.1"}}
    assert (data["device_id"], data["api_key"]) == (made.device_id, made.key) == ("c-cam-01", made.key)
    assert data["api_endpoint"] == f"{gw.url}/api"  # the gateway's, not the cloud's
    assert (data["edge_key"], data["portainer_endpoint_id"]) == ("edge-c-cam-01", 7)
    registered = devices(gw)["c-cam-01"]
    assert (registered["status"], registered["origin"]) == ("approved", "cloud")
    # The key works at once, and its uploads reach the cloud as that device.
    assert upload(gw, made.key, jpeg_bytes(4000)).status_code == 201
    assert cloud.wait_until(lambda c: any(a.device_id == "c-cam-01" and a.status == 201 for a in c.attempts), 30)

    assert provision(gw, pending_token, "cam-02", path="/api/core/devices/provision").status_code == 201
    assert devices(gw)["c-cam-02"]["status"] == "pending"  # the cloud's status

    # The cloud's own refusals pass through as they are.
    again = {"token": token, "device_info": {"device_id": "cam-01"}}
    through_gateway = httpx.post(f"{gw.url}/api/devices/provision", json=again, timeout=30)
    straight = httpx.post(f"{cloud.url}/devices/provision", json=again, timeout=30)
    assert through_gateway.status_code == straight.status_code == 409
    assert through_gateway.content == straight.content and error(through_gateway) == (409, "DEVICE_EXISTS")
    assert error(provision(gw, "apt_" + secrets.token_hex(16), "cam-03")) == (401, "INVALID_TOKEN")
    cloud.fail_next(1, 429, "9", path="/api/devices/provision")
    limited = provision(gw, token, "cam-03")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "9"
    assert error(httpx.post(f"{gw.url}/api/devices/provision", content=b'{"token": 1}', timeout=30)) == (
        400, "VALIDATION_ERROR")

    # The cloud cannot be reached: 503 with Retry-After, and nothing registered anywhere.
    before = sorted(devices(gw))
    cloud.refuse_connections()
    down = provision(gw, token, "cam-04")
    assert error(down) == (503, "SERVICE_UNAVAILABLE") and int(down.headers["retry-after"]) > 0
    assert sorted(devices(gw)) == before == ["c-cam-01", "c-cam-02"]
    assert len(cloud.provisioned) == 2
