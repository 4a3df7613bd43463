"""Losing part of a replicated store mid-traffic: a volume server, then the S3 process itself.

The gateway's minio backend points at the SeaweedFS cluster (tests/support/s3cluster.py: replication
``001``, three volume servers). Eight devices upload without pause and the forwarder drains into the
fake cloud (no local copy cache, so every forward reads its bytes back from the cluster) while one
cluster process is SIGKILLed and later started again. The promises checked afterwards:

- every upload answered 201 or 503 with ``Retry-After`` (never 500, never a dropped connection);
- every acknowledged upload is in the store with its XXH3-128 (read back directly, and
  ``gateway verify --full`` clean), and the catalog holds exactly the acknowledged images;
- the cloud got every acknowledged image once; any resend was absorbed as 409.

The figures (uploads acknowledged / refused, time to success after the death and back to full
speed after the return) are printed through tests/support/figures.py.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.support import figures
from tests.support.client import admin_status
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess, s3_env
from tests.support.s3cluster import S3Cluster
from tests.support.storm import Attempt, ReadyWatch, Storm, back_to_speed, recovery

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]
DEVICES = 8
WARM_S, AWAY_S, AFTER_S = 4.0, 5.0, 5.0


@pytest.fixture
def site(s3_cluster: S3Cluster, cloud: FakeCloud, tmp_path: Path) -> Iterator[tuple[GatewayProcess, list[str]]]:
    """A gateway on the cluster, forwarding to the fake cloud, with eight approved devices."""
    gw = GatewayProcess(tmp_path / "gw", s3_env(s3_cluster) | {
        "GATEWAY_CLOUD_URL": cloud.url, "GATEWAY_FORWARD_CONCURRENCY": "4",
        "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0",
        "GATEWAY_FORWARD_CACHE_BYTES": "0",  # the forwarder reads every image back from the cluster
    }).start()
    keys = []
    try:
        for i in range(DEVICES):
            key = "adk_" + secrets.token_hex(16)
            with gw.admin() as client:
                reply = client.post("/api/admin/devices", json={"name": f"cam{i}", "key": key})
                reply.raise_for_status()
            cloud.add_device(key, device_id=reply.json()["data"]["device"]["device_id"])
            keys.append(key)
        yield gw, keys
    finally:
        gw.stop()


def test_a_volume_server_killed_mid_traffic(request: pytest.FixtureRequest, s3_cluster: S3Cluster,
                                             cloud: FakeCloud, site: tuple[GatewayProcess, list[str]]) -> None:
    gw, keys = site
    victim = s3_cluster.volume_names[1]
    storm = Storm(gw.url, keys).start()
    try:
        started = storm.wait_acked(2 * DEVICES)
        time.sleep(WARM_S)
        died = time.monotonic()
        s3_cluster.kill(victim)
        time.sleep(AWAY_S)
        back = time.monotonic()
        s3_cluster.restart(victim)  # returns once the master lists it with all its volumes
        ready = time.monotonic()
        time.sleep(AFTER_S)
    finally:
        attempts = storm.stop()
        if not s3_cluster.nodes[victim].running:  # the test broke off: leave the cluster whole
            s3_cluster.restart(victim)
    end = time.monotonic()
    verdict = check_everything(gw, s3_cluster, cloud, attempts)
    speed, baseline = back_to_speed(attempts, (started, died), back, end)
    away = [a for a in attempts if died <= a.sent < back]
    report(request, "cluster_volume_kill", f"A volume server ({victim}) SIGKILLed for {AWAY_S:g} s under "
           f"{DEVICES} uploading devices and the forwarder", attempts, away, verdict, {
               "seconds from the death to uploads succeeding again": recovery(attempts, died, back),
               "seconds from its restart to the master listing it": round(ready - back, 2),
               "seconds from its restart to full speed (a 2 s span at >= 80 % of the rate before)": speed,
               "upload rate before the death (2xx/s)": baseline,
           })


def test_the_s3_process_killed_and_restarted(request: pytest.FixtureRequest, s3_cluster: S3Cluster,
                                             cloud: FakeCloud, site: tuple[GatewayProcess, list[str]]) -> None:
    gw, keys = site
    watch = ReadyWatch(gw.url).start()
    storm = Storm(gw.url, keys).start()
    try:
        started = storm.wait_acked(2 * DEVICES)
        time.sleep(WARM_S)
        died = time.monotonic()
        s3_cluster.kill("s3")
        time.sleep(AWAY_S)
        back = time.monotonic()
        s3_cluster.restart("s3")
        time.sleep(AFTER_S)
    finally:
        attempts = storm.stop()
        watch.stop()
        if not s3_cluster.nodes["s3"].running:
            s3_cluster.restart("s3")
    end = time.monotonic()
    not_ready, ready_again = watch.first(503, died), watch.first(200, back)
    assert not_ready is not None and not_ready < back, "/api/ready must turn 503 while the store is gone"
    assert ready_again is not None, "/api/ready must turn 200 again once the store is back"
    inside = [a for a in attempts if died <= a.sent and a.answered < back]  # no weed s3 ran all along
    assert inside and all(a.status == 503 for a in inside), Counter(a.status for a in inside)
    verdict = check_everything(gw, s3_cluster, cloud, attempts)
    speed, baseline = back_to_speed(attempts, (started, died), back, end)
    report(request, "cluster_s3_kill", f"The S3 process (weed s3) SIGKILLed for {AWAY_S:g} s under "
           f"{DEVICES} uploading devices and the forwarder", attempts, [a for a in attempts if died <= a.sent < back],
           verdict, {
               "seconds from the death to /api/ready answering 503": round(not_ready - died, 2),
               "seconds from the restart to /api/ready answering 200": round(ready_again - back, 2),
               "seconds from the restart to uploads succeeding again": recovery(attempts, died, back, back),
               "seconds from the restart to full speed (a 2 s span at >= 80 % of the rate before)": speed,
               "upload rate before the death (2xx/s)": baseline,
           })


def check_everything(gw: GatewayProcess, cluster: S3Cluster, cloud: FakeCloud,
                     attempts: list[Attempt]) -> dict[str, Any]:
    """Assert the promises of the module docstring; return what the report shows."""
    statuses = Counter(a.status for a in attempts)
    assert set(statuses) <= {201, 503}, f"only 201 or 503 may answer an upload: {statuses}"
    refused = [a for a in attempts if a.status == 503]
    assert all(a.retry_after and int(a.retry_after) > 0 and a.code == "SERVICE_UNAVAILABLE" for a in refused)
    acked = [a for a in attempts if a.acked]
    assert acked
    sent = {a.xxh3 for a in acked}
    assert len(sent) == len(acked)

    # In the store, byte for byte (read directly), and the catalog holds exactly these images.
    client, bucket = cluster.client(timeout=30), gw.env["GATEWAY_MINIO_BUCKET"]
    lost = []
    for a in acked:
        assert a.data is not None
        resp = client.get_object(bucket, a.data["storage_key"])
        try:
            if xxhash.xxh3_128_hexdigest(resp.read()) != a.xxh3:
                lost.append(a.data["storage_key"])
        finally:
            resp.close()
            resp.release_conn()
    assert lost == []
    assert admin_status(gw)["images"] == len(acked), "a refused upload must leave no catalog row"
    verify = json.loads(gw.cli("verify", "--full", "--json").stdout)
    assert verify["rows"] == len(acked) and verify["summary"]["unrepaired"] == 0, verify["summary"]
    assert verify["summary"]["missing"] == 0 and verify["summary"]["hash_mismatch"] == 0

    # Forwarded: every acknowledged image reached the cloud once; resends were absorbed as 409.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = admin_status(gw)
        if status["delivered_count"] == len(acked) and status["backlog_count"] == 0:
            break
        time.sleep(0.2)
    status = admin_status(gw)
    assert status["delivered_count"] == len(acked) and status["dead_count"] == 0, status
    assert set(cloud.stored) == sent, "the cloud holds exactly the acknowledged images"
    answers = Counter(r.status for r in cloud.attempts)
    assert set(answers) <= {201, 409}, answers
    return {"verify": verify, "verify_text": gw.cli("verify", "--full").stdout, "cloud_answers": answers,
            "lost": len(lost), "statuses": statuses}


def report(request: pytest.FixtureRequest, name: str, title: str, attempts: list[Attempt], away: list[Attempt],
           verdict: dict[str, Any], times: dict[str, float]) -> None:
    acked_away = sum(1 for a in away if a.acked)
    refused_away = sum(1 for a in away if a.status == 503)
    rows = [
        ("uploads sent / acknowledged / refused 503 (whole run)",
         f"{len(attempts)} / {verdict['statuses'][201]} / {verdict['statuses'][503]}"),
        ("uploads sent while it was away: acknowledged / refused 503", f"{acked_away} / {refused_away}"),
        ("acknowledged uploads lost or changed", verdict["lost"]),
        ("verify --full: rows / missing / hash mismatches",
         f"{verdict['verify']['rows']} / {verdict['verify']['summary']['missing']} / "
         f"{verdict['verify']['summary']['hash_mismatch']}"),
        ("cloud answers to the forwarder (201 / 409)",
         f"{verdict['cloud_answers'][201]} / {verdict['cloud_answers'][409]}"),
        *times.items(),
    ]
    figures.report(request.config, name, title, ["figure", "value"], rows,
                   {"gateway verify --full, afterwards": "\n" + verdict["verify_text"]})
