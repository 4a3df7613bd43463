"""The drain job end to end: a real gateway, the real `gateway drain` process killed half-way
through a batch (SIGKILL) and started again. Each image must land exactly once, verified, and
every batch be acked exactly once (counted by the gateway's metrics), on both backends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
import xxhash

from tests.conftest import BACKENDS_AND_CLUSTER, jpeg_bytes
from tests.support.client import upload, wait_for
from tests.support.gateway_proc import SYNC_TOKEN, GatewayProcess

pytestmark = pytest.mark.e2e
IMAGE_BYTES = 48 * 1024
MANIFEST = "manifest.parquet"


def drain_cmd(gw: GatewayProcess, dest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "drain", gw.url, str(dest), *extra]


def drain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return env | {"GATEWAY_SYNC_TOKEN": SYNC_TOKEN}


def run_drain(gw: GatewayProcess, dest: Path, *extra: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(drain_cmd(gw, dest, "--json", *extra), env=env or drain_env(), capture_output=True,
                          text=True, timeout=120)


def sync_batches(gw: GatewayProcess, state: str | None = None) -> list[dict[str, Any]]:
    params = {"limit": 1000} | ({"state": state} if state else {})
    resp = httpx.get(f"{gw.url}/api/sync/batches", params=params,
                     headers={"Authorization": f"Bearer {SYNC_TOKEN}"}, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"]  # type: ignore[no-any-return]


def ack_counts(gw: GatewayProcess) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in httpx.get(f"{gw.url}/metrics", timeout=30).text.splitlines():
        if line.startswith("acusight_gateway_sync_acks_total{"):
            found[line.split('outcome="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return found


def image_files(dest: Path) -> list[Path]:
    return [p for p in dest.glob("batch_*/*") if p.name != MANIFEST and not p.name.endswith(".part")]


@pytest.mark.parametrize("backend", BACKENDS_AND_CLUSTER)
def test_drain_killed_half_way_then_resumed(
    backend: str, start_gateway: Callable[..., GatewayProcess], backend_env: Callable[[str], dict[str, str]],
    tmp_path: Path,
) -> None:
    # timeout_s 60: the sealer ticks every 3 s; the last batch is sealed by hand, not by time.
    gw = start_gateway(backend_env(backend) | {"GATEWAY_BATCHES_MAX_IMAGES": "5", "GATEWAY_BATCHES_TIMEOUT_S": "60"})
    _, key = gw.add_device("cam-drain")
    sent: dict[str, tuple[str, bytes]] = {}  # image_id -> batch_id, bytes
    for n in range(23):
        image = jpeg_bytes(IMAGE_BYTES + n)
        data = upload(gw, key, image, filename=f"cam/{n}.jpg").json()["data"]
        sent[data["image_id"]] = (data["batch_id"], image)
    last = next(b for b in sync_batches(gw) if b["state"] == "collecting")
    gw.cli("batches", "seal", last["batch_id"])
    wait_for("five drainable batches", lambda: len(sync_batches(gw, "forwarded")) == 5)
    dest = tmp_path / "drained"

    refused = run_drain(gw, dest, env=drain_env() | {"GATEWAY_SYNC_TOKEN": "wrong-token-0123456789"})
    assert refused.returncode == 2 and "UNAUTHORIZED" in refused.stderr

    # Slowed down (a bandwidth cap) so that the kill lands while a batch is half on disk.
    with open(tmp_path / "killed-drain.log", "wb") as log:
        proc = subprocess.Popen(drain_cmd(gw, dest, "--limit-rate", "160K", "--jobs", "2"), env=drain_env(),
                                stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for("seven images on disk", lambda: (n := len(image_files(dest))) >= 7 and n % 5, timeout=60)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    landed = image_files(dest)
    on_disk = Counter(p.parent.name for p in landed)
    expected = Counter(batch_id for batch_id, _ in sent.values())
    drained_before = {b["batch_id"]: b["drained_at"] for b in sync_batches(gw, "drained")}
    assert 1 <= len(drained_before) < 5
    assert all(on_disk[b] == expected[b] for b in drained_before)  # acked only once wholly on disk
    partial = [b for b in on_disk if b not in drained_before and on_disk[b] < expected[b]]
    assert partial, "the kill should land half-way through a batch"
    # A file that is there but wrong (a torn copy, a disk error) must be fetched again, not kept.
    victim = next(p for p in landed if p.parent.name == partial[0])
    victim.write_bytes(b"\xff\xd8\xff garbage")

    resumed = run_drain(gw, dest)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert sorted(report["batches_drained"]) == sorted(b for b in {b for b, _ in sent.values()}
                                                       if b not in drained_before)
    assert report["batches_failed"] == {}
    assert report["images_kept"] == len([p for p in landed if p.parent.name not in drained_before]) - 1
    assert report["images_kept"] + report["images_downloaded"] == 23 - sum(expected[b] for b in drained_before)

    # Each image exactly once, under its batch, byte for byte; nothing half-written left behind.
    files = image_files(dest)
    assert len(files) == 23 and not list(dest.rglob("*.part"))
    for image_id, (batch_id, image) in sent.items():
        (path,) = [p for p in files if p.name.startswith(f"{image_id}_")]
        assert path.parent.name == batch_id and path.read_bytes() == image
        assert xxhash.xxh3_128_hexdigest(path.read_bytes()) == xxhash.xxh3_128_hexdigest(image)
    for folder in dest.glob("batch_*"):
        with duckdb.connect() as db:
            rows = db.execute("SELECT image_id, xxh3_128 FROM read_parquet(?)", [str(folder / MANIFEST)]).fetchall()
        assert {i for i, _ in rows} == {i for i, (b, _) in sent.items() if b == folder.name}
        assert all(xxhash.xxh3_128_hexdigest(sent[i][1]) == h for i, h in rows)

    # Every batch acked exactly once; the ones acked before the kill kept their drained time.
    assert sync_batches(gw, "forwarded") == []
    drained = {b["batch_id"]: b["drained_at"] for b in sync_batches(gw, "drained")}
    assert len(drained) == 5 and all(drained[b] == t for b, t in drained_before.items())
    counts = ack_counts(gw)
    assert counts["drained"] == 5.0 and counts.get("already_drained", 0.0) == 0.0
    assert counts.get("refused", 0.0) == 0.0

    # A third run finds nothing to do; acking a drained batch again changes nothing.
    idle = run_drain(gw, dest)
    assert idle.returncode == 0 and json.loads(idle.stdout)["batches_drained"] == []
    batch_id = next(iter(drained))
    with httpx.Client(base_url=f"{gw.url}/api/sync", headers={"Authorization": f"Bearer {SYNC_TOKEN}"}) as c:
        again = c.post(f"/batches/{batch_id}/ack").json()["data"]
    assert again["state"] == "drained" and again["drained_at"] == drained[batch_id]
    counts = ack_counts(gw)
    assert counts["drained"] == 5.0 and counts["already_drained"] == 1.0
    assert len(image_files(dest)) == 23
