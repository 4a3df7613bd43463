"""kill -9 inside each window of an upload whose catalog record and PUT run side by side, on both
backends: the restart settles every combination the crash can leave, as the reconciliation does.

The process is held inside a window by a failpoint (`gateway.system.failpoints`): the upload
stops for good at that point, the test sees the marker file, and kills the process there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from tests.conftest import BACKENDS, jpeg_bytes
from tests.e2e.test_durability import catalog_rows
from tests.support.client import admin_status, stored_objects, wait_for
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess, s3_env
from tests.support.s3server import S3Server

pytestmark = pytest.mark.e2e


_STARTED: list[GatewayProcess] = []


@pytest.fixture(autouse=True)
def _kill_what_was_started() -> Iterator[None]:
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.pid is not None:
            proc.kill()


def _env(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    return s3_env(request.getfixturevalue("s3")) if backend == "minio" else {"GATEWAY_STORAGE_BACKEND": "folder"}


def _upload(proc: GatewayProcess, key: str, image: bytes) -> httpx.Response:
    with httpx.Client(timeout=120) as client:
        return client.post(f"{proc.url}/api/device/images/upload", headers={"X-Device-Key": key},
                           files={"image": ("held.jpg", image, "image/jpeg")})


def _held_upload(proc: GatewayProcess, key: str, point: str, image: bytes | None = None) -> dict[str, Any]:
    """Start one upload and wait until it is held at `point`; returns what the client sees (filled
    in when the answer arrives: `status`, `body`)."""
    marker = Path(proc.env["GATEWAY_DATA_DIR"]) / "failpoints" / point
    seen: dict[str, Any] = {}
    sent = image if image is not None else jpeg_bytes(200 * 1024)

    def send() -> None:
        try:
            resp = _upload(proc, key, sent)
            seen["body"] = resp.json()
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
    """Start the gateway again (unless running) and wait until every leftover intent is settled;
    returns the status's `startup` then."""
    proc.env.pop("GATEWAY_FAILPOINTS", None)
    if proc.pid is None:
        proc.start()
    # An intent whose object is not in the store is kept for a quiet period (a PUT the dead
    # process sent may still land), then settled by the periodic pass.
    deadline = time.monotonic() + 90
    while admin_status(proc)["startup"]["unsettled_intents"] and time.monotonic() < deadline:
        time.sleep(1)
    startup = admin_status(proc)["startup"]
    assert startup["unsettled_intents"] == 0
    return startup  # type: ignore[no-any-return]


def _batch_count(proc: GatewayProcess) -> int:
    con = duckdb.connect(str(Path(proc.env["GATEWAY_DATA_DIR"]) / "catalog.duckdb"), read_only=True)
    try:
        row = con.execute("SELECT count(*) FROM batches").fetchone()
    finally:
        con.close()
    return int(row[0]) if row else -1


def _started_with(env: dict[str, str], workdir: Path, point: str) -> tuple[GatewayProcess, str, str]:
    """A gateway whose uploads stop at failpoint `point`, and one device: (process, device id, key).
    Killed at the end of the test whatever happened (a held upload never ends on its own)."""
    proc = GatewayProcess(workdir, env | {"GATEWAY_FAILPOINTS": point})
    _STARTED.append(proc)
    proc.start()
    device_id, key = proc.add_device("cam-" + point.replace(".", "-").replace(":", "-"))
    return proc, device_id, key


def _spool(proc: GatewayProcess) -> list[str]:
    return sorted(p.name for p in (Path(proc.env["GATEWAY_DATA_DIR"]) / "spool").glob("*.part"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_with_the_record_written_and_the_object_not_stored(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """The record is journaled (fsynced) while the PUT never happens: the restart withdraws it."""
    proc, _, key = _started_with(_env(request, backend), tmp_path / "g", "upload.before_put")
    image = jpeg_bytes(200 * 1024)
    seen = _held_upload(proc, key, "upload.before_put", image)
    entries = wait_for("the record in the catalog", lambda: _outbox(proc))  # its object is not in the store
    assert len(entries) == 1 and stored_objects(proc) == {}
    withdrawn_id = entries[0]["image_id"]
    proc.kill()
    assert "status" not in seen  # never acknowledged

    proc.env.pop("GATEWAY_FAILPOINTS")
    proc.start()
    # The device retries at once: its earlier upload's row is there, its object is not (the
    # reconciliation keeps the row for a quiet period): no "duplicate" answer may point at it.
    early = _upload(proc, key, image)
    assert early.status_code == 503 and early.headers["Retry-After"] == "5", early.text
    startup = _restart_and_settle(proc)
    assert startup["missing_objects"] == []  # held back as storing, not reported as lost
    assert startup["withdrawn"] == 1
    assert _outbox(proc) == [] and _spool(proc) == []
    again = _upload(proc, key, image)  # settled: the retry is a new upload, stored for good
    assert again.status_code == 201 and again.json()["data"]["image_id"] != withdrawn_id
    assert proc.stop() == 0
    assert list(catalog_rows(proc)) == [again.json()["data"]["image_id"]] and len(stored_objects(proc)) == 1
    assert _batch_count(proc) == 1, "the batch the withdrawn upload opened went with it"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_with_the_object_stored_and_the_record_not_written(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """The PUT completes while the record never goes: the restart removes the stray object."""
    proc, _, key = _started_with(_env(request, backend), tmp_path / "g", "upload.before_record")
    seen = _held_upload(proc, key, "upload.before_record")
    wait_for("the object in the store", lambda: stored_objects(proc))
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
    proc, _, key = _started_with(_env(request, backend), tmp_path / "g", "upload.before_answer")
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
    proc, device_id, key = _started_with(env, tmp_path / "g", "upload.before_put")
    cloud.add_device(key, device_id=device_id)
    _held_upload(proc, key, "upload.before_put")
    wait_for("the record in the catalog", lambda: _outbox(proc))
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


def test_an_image_held_while_its_object_is_stored_is_sent_as_soon_as_it_is(
    tmp_path: Path, cloud: FakeCloud
) -> None:
    """The forwarder reads the record while the PUT waits (3 s) and leaves it; the word that the
    object is stored wakes it (the next periodic read is 15 s away)."""
    env = {"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_CLOUD_URL": cloud.url}
    proc, device_id, key = _started_with(env, tmp_path / "g", "upload.before_put:3")
    cloud.add_device(key, device_id=device_id)
    seen = _held_upload(proc, key, "upload.before_put")
    wait_for("the record in the catalog", lambda: _outbox(proc))  # the PUT has not begun
    time.sleep(1.0)
    assert "status" not in seen and not cloud.attempts  # nothing was sent while the object was missing
    wait_for("the answer", lambda: "status" in seen)
    answered = time.monotonic()
    assert seen["status"] == 201
    assert cloud.wait_until(lambda c: len(c.stored) == 1, timeout=10), cloud.stats()
    assert time.monotonic() - answered < 4.0
    assert len(cloud.attempts) == 1
    assert proc.stop() == 0


def test_a_put_that_fails_after_the_record_withdraws_it_before_the_503(tmp_path: Path) -> None:
    """The store dies while the upload waits before its PUT (3 s); the record, already journaled,
    is withdrawn before the device gets its 503: no row, no outbox entry, the batch gone too."""
    s3 = S3Server(tmp_path / "s3").start()
    proc, _, key = _started_with(s3_env(s3), tmp_path / "g", "upload.before_put:3")
    try:
        seen = _held_upload(proc, key, "upload.before_put")
        wait_for("the record in the catalog", lambda: _outbox(proc))
        s3.kill()
        wait_for("the answer", lambda: "status" in seen, timeout=60)
        assert seen["status"] == 503 and seen["body"]["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert _outbox(proc) == []
        assert admin_status(proc)["images"] == 0
        assert proc.stop() == 0
        assert catalog_rows(proc) == {} and _batch_count(proc) == 0
    finally:
        proc.stop()
        s3.stop()
