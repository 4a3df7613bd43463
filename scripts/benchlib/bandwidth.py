"""`scripts/bench --only bandwidth`: how close the forwarder comes to `forward.bandwidth_bytes_per_s`.

The pass/fail test (tests/integration/test_forwarder.py) checks that the cap is never exceeded;
this section reports the measured rate against the cap, whose target is within ±15 %.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

from tests.conftest import jpeg_bytes
from tests.support.client import upload
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess, s3_env
from tests.support.s3cluster import S3Cluster
from tests.support.s3server import S3Server


def bandwidth_section(s3: S3Server | S3Cluster, work: Path, quick: bool, cap: int = 2_000_000) -> dict[str, Any]:
    """The backlog built while the cloud is down, then drained under the cap: bytes / seconds from
    the first arrival to the last, against the cap."""
    images, size = (20, 1_000_000) if quick else (60, 1_000_000)
    cloud = FakeCloud().start()
    gw = GatewayProcess(work / "gw-bandwidth", s3_env(s3) | {
        "GATEWAY_CLOUD_URL": cloud.url, "GATEWAY_FORWARD_BANDWIDTH_BYTES_PER_S": str(cap),
        "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1",
    })
    try:
        key = "adk_" + secrets.token_hex(16)
        cloud.add_device(key)
        cloud.refuse_connections()
        gw.start()
        with gw.admin() as client:
            client.post("/api/admin/devices", json={"name": "bw", "key": key}).raise_for_status()
        refused = sum(upload_as_a_device(gw, key, jpeg_bytes(size + i), f"bw-{i}.jpg") for i in range(images))
        started = time.monotonic()
        cloud.accept_connections()
        cloud.wait_until(lambda c: len(c.stored) == images, timeout=images * size / cap * 3 + 60)
        stored = list(cloud.stored.values())
        sent = sum(r.size for r in stored)
        elapsed = max(r.at for r in stored) - started if stored else float("nan")
        rate = sent / elapsed if stored else 0.0
        return {"cap_bytes_per_s": cap, "images": len(stored), "bytes": sent, "seconds": round(elapsed, 2),
                "rate_bytes_per_s": round(rate), "rate_vs_cap": round(rate / cap, 3), "target": "0.85-1.15",
                "uploads_refused_503": refused}
    finally:
        gw.stop()
        cloud.stop()


def upload_as_a_device(gw: GatewayProcess, key: str, image: bytes, filename: str, attempts: int = 5) -> int:
    """Upload as a device does: a 503 (the store busy for a moment, e.g. a cluster adding volumes)
    is sent again after its Retry-After. Returns how many 503s it met."""
    refused = 0
    while True:
        resp = upload(gw, key, image, filename=filename)
        if resp.status_code != 503 or refused == attempts - 1:
            if resp.is_error:
                raise RuntimeError(f"upload answered {resp.status_code} {resp.text}; gateway log:\n{gw.log_tail()}")
            return refused
        refused += 1
        time.sleep(float(resp.headers.get("Retry-After", "1")))
