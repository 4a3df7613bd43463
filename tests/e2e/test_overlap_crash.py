"""kill -9 inside each window of an upload whose catalog record and PUT run side by side, on both
backends: the restart settles every combination the crash can leave, as the reconciliation does.

The process is held inside a window by a failpoint (`gateway.system.failpoints`): the upload
stops for good at that point, the test sees the marker file, and kills the process there.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from tests.conftest import BACKENDS, jpeg_bytes
from tests.e2e.test_durability import catalog_rows
from tests.support.client import admin_status, stored_objects
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess, s3_env

pytestmark = pytest.mark.e2e


def _env(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    return s3_env(request.getfixturevalue("s3")) if backend == "minio" else {"GATEWAY_STORAGE_BACKEND": "folder"}


def _held_upload(proc: GatewayProcess, key: str, point: str) -> dict[str, Any]:
    """Start one upload and wait until it is held at `point`; returns what the client saw (nothing)."""
    marker = Path(proc.env["GATEWAY_DATA_DIR"]) / "failpoints" / point
    seen: dict[str, Any] = {}

    def send() -> None:
        try:
            with httpx.Client(timeout=120) as client:
                resp = client.post(f"{proc.url}/api/device/images/upload", headers={"X-Device-Key": key},
                                   files={"image": ("held.jpg", jpeg_bytes(200 * 1024), "image/jpeg")})
            seen["status"] = resp.status_code
        except httpx.HTTPError as exc:
            seen["error"] = type(exc).__name__

    threading.Thread(target=send, daemon=True).start()
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, f"the upload never reached {point}:\n{proc.log_tail()}"
        time.sleep(0.02)
    return seen


def _outbox(proc: GatewayProcess) -> list[dict[str, Any]]:
    with proc.admin() as client:
        resp = client.get("/api/admin/outbox/", params={"state": "all"})
        resp.raise_for_status()
        return resp.json()["data"]  # type: ignore[no-any-return]


def _restart_and_settle(proc: GatewayProcess) -> dict[str, Any]:
    proc.env.pop("GATEWAY_FAILPOINTS", None)
    proc.start()
    startup = admin_status(proc)["startup"]
    # An intent whose object is not in the store is kept for a quiet period (a PUT the dead
    # process sent may still land), then settled by the periodic pass.
    deadline = time.monotonic() + 90
    while admin_status(proc)["startup"]["unsettled_intents"] and time.monotonic() < deadline:
        time.sleep(1)
    assert admin_status(proc)["startup"]["unsettled_intents"] == 0
    return startup


def _batch_count(proc: GatewayProcess) -> int:
    con = duckdb.connect(str(Path(proc.env["GATEWAY_DATA_DIR"]) / "catalog.duckdb"), read_only=True)
    try:
        row = con.execute("SELECT count(*) FROM batches").fetchone()
    finally:
        con.close()
    return int(row[0]) if row else -1


def _spool(proc: GatewayProcess) -> list[str]:
    return sorted(p.name for p in (Path(proc.env["GATEWAY_DATA_DIR"]) / "spool").glob("*.part"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_with_the_record_written_and_the_object_not_stored(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """The record is journaled (fsynced) while the PUT never happens: the restart withdraws it."""
    proc = GatewayProcess(tmp_path / "g", _env(request, backend) | {"GATEWAY_FAILPOINTS": "upload.before_put"})
    proc.start()
    _, key = proc.add_device("cam-window-1")
    seen = _held_upload(proc, key, "upload.before_put")
    deadline = time.monotonic() + 30
    while not (entries := _outbox(proc)):  # the row is in the catalog, its object is not in the store
        assert time.monotonic() < deadline, "the record never reached the catalog"
        time.sleep(0.05)
    assert len(entries) == 1 and stored_objects(proc) == {}
    proc.kill()
    assert "status" not in seen  # never acknowledged

    startup = _restart_and_settle(proc)
    assert startup["missing_objects"] == []  # held back as storing, not reported as lost
    assert _outbox(proc) == [] and _spool(proc) == []
    assert proc.stop() == 0
    assert catalog_rows(proc) == {} and stored_objects(proc) == {}
    assert _batch_count(proc) == 0, "the batch the withdrawn upload opened goes with it"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_with_the_object_stored_and_the_record_not_written(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """The PUT completes while the record never goes: the restart removes the stray object."""
    proc = GatewayProcess(tmp_path / "g", _env(request, backend) | {"GATEWAY_FAILPOINTS": "upload.before_record"})
    proc.start()
    _, key = proc.add_device("cam-window-2")
    seen = _held_upload(proc, key, "upload.before_record")
    deadline = time.monotonic() + 30
    while not stored_objects(proc):
        assert time.monotonic() < deadline, "the object never reached the store"
        time.sleep(0.05)
    proc.kill()
    assert "status" not in seen

    startup = _restart_and_settle(proc)
    assert startup["strays_removed"] == 1 and startup["committed"] == 0 and startup["withdrawn"] == 0
    assert _spool(proc) == []
    assert proc.stop() == 0
    assert catalog_rows(proc) == {} and stored_objects(proc) == {}


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_with_both_done_before_the_answer(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """Record and object both there, the answer not sent: the upload is kept whole (the device,
    retrying, gets the same image as a duplicate)."""
    proc = GatewayProcess(tmp_path / "g", _env(request, backend) | {"GATEWAY_FAILPOINTS": "upload.before_answer"})
    proc.start()
    _, key = proc.add_device("cam-window-3")
    seen = _held_upload(proc, key, "upload.before_answer")
    proc.kill()
    assert "status" not in seen

    startup = _restart_and_settle(proc)
    assert startup["reconciled_intents"] == 1 and startup["committed"] == 1 and startup["withdrawn"] == 0
    assert startup["missing_objects"] == [] and _spool(proc) == []
    assert proc.stop() == 0
    rows = catalog_rows(proc)
    objects = stored_objects(proc)
    assert len(rows) == 1 and {r[0] for r in rows.values()} == set(objects)



def test_the_forwarder_leaves_a_recorded_image_alone_until_its_object_is_stored(
    tmp_path: Path, cloud: FakeCloud
) -> None:
    """Held with its record in the catalog and its PUT not made, the image is not sent (its bytes
    are not there); after a kill -9 it is withdrawn, never sent, and the next uploads flow."""
    env = {"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_CLOUD_URL": cloud.url,
           "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0"}
    proc = GatewayProcess(tmp_path / "g", env | {"GATEWAY_FAILPOINTS": "upload.before_put"})
    proc.start()
    device_id, key = proc.add_device("cam-forward")
    cloud.add_device(key, device_id=device_id)
    _held_upload(proc, key, "upload.before_put")
    deadline = time.monotonic() + 30
    while not _outbox(proc):
        assert time.monotonic() < deadline, "the record never reached the catalog"
        time.sleep(0.05)
    time.sleep(2.0)  # the forwarder has read the outbox several times by now (it does after each apply)
    entry = _outbox(proc)[0]
    assert entry["state"] == "pending" and entry["attempts"] == 0 and not cloud.attempts
    proc.kill()

    _restart_and_settle(proc)
    assert _outbox(proc) == [] and not cloud.attempts
    sent = jpeg_bytes(50 * 1024)
    with httpx.Client(timeout=30) as client:
        resp = client.post(f"{proc.url}/api/device/images/upload", headers={"X-Device-Key": key},
                           files={"image": ("next.jpg", sent, "image/jpeg")})
    assert resp.status_code == 201
    assert cloud.wait_until(lambda c: len(c.stored) == 1, timeout=30), cloud.stats()
    assert len(cloud.attempts) == 1
    assert proc.stop() == 0
