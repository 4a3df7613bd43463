"""Unknown device keys cannot make the gateway flood the cloud or fill its registry (issue 23,
item 9): look-ups at the cloud share one gateway-wide token bucket, and quarantine is capped.
Real gateway processes and the fake cloud on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.conftest import jpeg_bytes
from tests.support.client import upload
from tests.support.fakecloud import SELF_PATH, FakeCloud
from tests.support.gateway_proc import GatewayProcess

BASE = {
    "GATEWAY_STORAGE_BACKEND": "folder",
    "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2",
    "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0",
    "GATEWAY_CLOUD_TIMEOUT_S": "10",
}


def _key(i: int) -> str:
    return "adk_" + f"{i:032x}"


def test_many_new_keys_cost_the_cloud_one_bucket_of_lookups(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud
) -> None:
    gw = start_gateway({**BASE, "GATEWAY_CLOUD_URL": cloud.url, "GATEWAY_LIMITS_UNKNOWN_KEY_CHECKS_PER_MINUTE": "5"})
    started = time.monotonic()
    answers = [upload(gw, _key(1000 + i), jpeg_bytes(2000 + i)) for i in range(40)]
    refilled = (time.monotonic() - started) * 5 / 60  # the bucket refills 5 a minute while this runs
    asked = cloud.count_requests(SELF_PATH)
    assert asked <= 5 + refilled + 1, f"the cloud was asked {asked} times for 40 made-up keys"
    codes = [(r.status_code, r.json()["error"]["code"]) for r in answers]
    assert codes[:5] == [(401, "INVALID_DEVICE_KEY")] * 5  # the cloud said no
    limited = [r for r in answers if r.status_code == 429]
    assert len(limited) == 40 - asked
    assert all(r.json()["error"]["code"] == "RATE_LIMITED" and int(r.headers["retry-after"]) >= 1 for r in limited)


def test_quarantine_is_capped(start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud) -> None:
    gw = start_gateway({**BASE, "GATEWAY_CLOUD_URL": cloud.url, "GATEWAY_CLOUD_ACCEPT_UNKNOWN_KEYS_OFFLINE": "true",
                        "GATEWAY_LIMITS_MAX_QUARANTINED_DEVICES": "3"})
    cloud.refuse_connections()
    statuses = [upload(gw, _key(2000 + i), jpeg_bytes(3000 + i)).status_code for i in range(8)]
    assert statuses[:3] == [201, 201, 201]
    refused = [upload(gw, _key(2000 + i), jpeg_bytes(3100 + i)) for i in range(3, 8)]
    assert all(r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED" for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert "quarantine" in refused[0].json()["error"]["details"]
    devices = json.loads(gw.cli("devices", "list", "--json").stdout)
    assert sorted(d["origin"] for d in devices) == ["quarantine"] * 3
    # A device already in quarantine keeps uploading.
    assert upload(gw, _key(2000), jpeg_bytes(3200)).status_code == 201


def test_a_zero_quarantine_cap_takes_no_unknown_key(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud
) -> None:
    gw = start_gateway({**BASE, "GATEWAY_CLOUD_URL": cloud.url, "GATEWAY_CLOUD_ACCEPT_UNKNOWN_KEYS_OFFLINE": "true",
                        "GATEWAY_LIMITS_MAX_QUARANTINED_DEVICES": "0"})
    cloud.refuse_connections()
    assert upload(gw, _key(1), jpeg_bytes(100)).status_code == 429
