"""Near-duplicate frames over real HTTP on both storage backends (`dedup.near_duplicates`):
keep records the relation and forwards, hold stores without forwarding until `outbox retry`,
reject answers 409 and stores nothing; annotated frames and exempt devices go through."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import xxhash

from gateway.humanize import human_bytes
from tests.conftest import BACKENDS, jpeg_bytes
from tests.support.client import admin_status, metrics, spool_files, stored_objects, upload, wait_for
from tests.support.fakecloud import FakeCloud
from tests.support.frames import Scene, capture, draw
from tests.support.gateway_proc import ADMIN_TOKEN, SYNC_TOKEN, GatewayProcess

FAST = {"GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0",
        "GATEWAY_CLOUD_TIMEOUT_S": "10", "GATEWAY_BATCHES_MAX_IMAGES": "1000"}
ANNOTATED = json.dumps({"model_id": "defect-v3", "annotations": [
    {"class_value": "scratch", "type": "bbox", "geometry": [0.5, 0.5, 0.1, 0.1], "confidence": 0.9}]})


@pytest.fixture(scope="module")
def frames() -> dict[str, bytes]:
    """A reference frame, two near-duplicates of it (noise, 1 px jitter, other JPEG quality) and
    the same scene with a scratch a few pixels wide on the part."""
    base = Scene(seed=5, parts=((300, 250),))
    scene = draw(base)
    scratched = draw(Scene(seed=5, parts=((300, 250),), scratches=((400, 330, 450, 350, 3, -70),)))
    return {
        "first": capture(scene, 1, shift=(0, 0), sigma=4.0, quality=90),
        "again": capture(scene, 2, shift=(1, 0), sigma=4.0, quality=80),
        "again2": capture(scene, 3, shift=(0, 1), sigma=5.0, quality=70),
        "again3": capture(scene, 4, shift=(1, 1), sigma=3.0, quality=85),
        "scratch": capture(scratched, 5, shift=(0, 0), sigma=4.0, quality=90),
    }


def _gateway(start_gateway: Callable[..., GatewayProcess], backend_env: Callable[[str], dict[str, str]],
             backend: str, action: str, cloud: FakeCloud | None = None) -> GatewayProcess:
    # Every frame fingerprinted, however busy the machine running the suite is.
    env = backend_env(backend) | FAST | {"GATEWAY_DEDUP_NEAR_DUPLICATES": action,
                                         "GATEWAY_DEDUP_NEAR_MIN_IDLE_CORES": "0"}
    if cloud is not None:
        env["GATEWAY_CLOUD_URL"] = cloud.url
    return start_gateway(env)  # type: ignore[no-any-return]


def _device(gw: GatewayProcess, cloud: FakeCloud | None = None) -> tuple[str, str]:
    device_id, key = gw.add_device("line-3 camera")
    if cloud is not None:
        cloud.add_device(key, device_id=device_id)
    return device_id, key


def _ok(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 201, resp.text
    return resp.json()["data"]  # type: ignore[no-any-return]


def _manifest(gw: GatewayProcess, batch_id: str) -> dict[str, dict[str, Any]]:
    """The batch's manifest rows (sync API), by image id."""
    resp = httpx.get(f"{gw.url}/api/sync/batches/{batch_id}", headers={"Authorization": f"Bearer {SYNC_TOKEN}"})
    resp.raise_for_status()
    return {r["image_id"]: r for r in resp.json()["data"]["manifest"]}


def _outbox(gw: GatewayProcess) -> dict[str, str]:
    rows = json.loads(gw.cli("outbox", "list", "--json", "--state", "all").stdout)
    return {r["image_id"]: r["state"] for r in rows}


def _digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_records_the_relation_and_forwards_everything(
    backend: str, frames: dict[str, bytes], start_gateway: Callable[..., GatewayProcess],
    backend_env: Callable[[str], dict[str, str]], cloud: FakeCloud,
) -> None:
    gw = _gateway(start_gateway, backend_env, backend, "keep", cloud)
    _, key = _device(gw, cloud)
    first = _ok(upload(gw, key, frames["first"]))
    again = _ok(upload(gw, key, frames["again"]))
    scratch = _ok(upload(gw, key, frames["scratch"]))
    broken = _ok(upload(gw, key, jpeg_bytes(50_000)))  # JPEG magic, random bytes: no fingerprint, stored
    assert cloud.wait_until(lambda c: len(c.stored) == 4, timeout=60), cloud.stats()
    rows = _manifest(gw, first["batch_id"])
    assert rows[again["image_id"]]["near_duplicate_of"] == first["image_id"]
    assert rows[first["image_id"]]["near_duplicate_of"] is None
    assert rows[scratch["image_id"]]["near_duplicate_of"] is None  # the scratch is a change, never swallowed
    assert rows[broken["image_id"]]["near_duplicate_of"] is None
    m = metrics(gw)
    assert m[f'acusight_gateway_near_duplicates_total{{action="keep",device_id="{_device_id(rows, again)}"}}'] == 1
    assert m['acusight_gateway_fingerprints_total{result="undecodable"}'] == 1
    assert m['acusight_gateway_fingerprints_total{result="done"}'] == 3
    assert m["acusight_gateway_near_duplicate_bytes_not_sent_total"] == 0


def _device_id(rows: dict[str, dict[str, Any]], result: dict[str, Any]) -> str:
    return rows[result["image_id"]]["device_id"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hold_keeps_near_duplicates_at_the_edge_until_released(
    backend: str, frames: dict[str, bytes], start_gateway: Callable[..., GatewayProcess],
    backend_env: Callable[[str], dict[str, str]], cloud: FakeCloud,
) -> None:
    gw = _gateway(start_gateway, backend_env, backend, "hold", cloud)
    _, key = _device(gw, cloud)
    first = _ok(upload(gw, key, frames["first"]))
    held = _ok(upload(gw, key, frames["again"]))
    annotated = _ok(upload(gw, key, frames["again2"], metadata=ANNOTATED))  # the device saw something
    scratch = _ok(upload(gw, key, frames["scratch"]))
    assert held["image_id"] != first["image_id"]  # answered with its own ids
    assert cloud.wait_until(lambda c: len(c.stored) == 3, timeout=60), cloud.stats()
    assert _digest(frames["again"]) not in cloud.stored
    states = _outbox(gw)
    assert states[held["image_id"]] == "skipped"
    assert {states[i["image_id"]] for i in (first, annotated, scratch)} == {"delivered"}
    gw.cli("batches", "seal", first["batch_id"])
    rows = _manifest(gw, first["batch_id"])
    assert rows[held["image_id"]]["near_duplicate_of"] == first["image_id"]
    assert rows[annotated["image_id"]]["near_duplicate_of"] == first["image_id"]
    size = len(frames["again"])
    assert metrics(gw)["acusight_gateway_near_duplicate_bytes_not_sent_total"] == size
    page = httpx.get(f"{gw.url}/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    saved = page.split('data-figure="uplink-saved">', 1)[1]
    assert saved.startswith(human_bytes(size)), saved[:80]  # the status page shows the uplink saved
    # The batch counts as forwarded: its held frame is settled, not waiting.
    wait_for("batch forwarded", lambda: _batch_state(gw, first["batch_id"]) == "forwarded")

    out = gw.cli("outbox", "retry", "--all-skipped").stdout
    assert "1 held near-duplicate(s) released" in out
    assert cloud.wait_until(lambda c: _digest(frames["again"]) in c.stored, timeout=60), cloud.stats()
    wait_for("released entry delivered", lambda: _outbox(gw)[held["image_id"]] == "delivered")


def _batch_state(gw: GatewayProcess, batch_id: str) -> str:
    resp = httpx.get(f"{gw.url}/api/sync/batches/{batch_id}", headers={"Authorization": f"Bearer {SYNC_TOKEN}"})
    return resp.json()["data"]["batch"]["state"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reject_answers_409_and_stores_nothing_unless_the_device_is_exempt(
    backend: str, frames: dict[str, bytes], start_gateway: Callable[..., GatewayProcess],
    backend_env: Callable[[str], dict[str, str]],
) -> None:
    gw = _gateway(start_gateway, backend_env, backend, "reject")
    device_id, key = _device(gw)
    first = _ok(upload(gw, key, frames["first"]))
    images, objects = admin_status(gw)["images"], set(stored_objects(gw))

    resp = upload(gw, key, frames["again"])
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["error"]["code"] == "NEAR_DUPLICATE_IMAGE"
    assert body["data"] == {k: first[k] for k in ("image_id", "batch_id", "storage_key")}
    assert admin_status(gw)["images"] == images
    assert set(stored_objects(gw)) == objects
    assert spool_files(gw) == []
    assert metrics(gw)["acusight_gateway_near_duplicate_bytes_not_sent_total"] == len(frames["again"])

    _ok(upload(gw, key, frames["again2"], metadata=ANNOTATED))  # annotated: never rejected
    _ok(upload(gw, key, frames["scratch"]))  # a change

    out = gw.cli("devices", "near-dup", device_id, "off").stdout
    assert "near-duplicate filter off" in out
    _ok(upload(gw, key, frames["again3"]))  # an exempt device's frames are never compared
    devices = json.loads(gw.cli("devices", "list", "--json").stdout)
    assert [d["near_dup_exempt"] for d in devices if d["device_id"] == device_id] == [True]


def test_the_exemption_is_set_on_a_stopped_server_too(
    frames: dict[str, bytes], start_gateway: Callable[..., GatewayProcess],
    backend_env: Callable[[str], dict[str, str]],
) -> None:
    gw = _gateway(start_gateway, backend_env, "folder", "reject")
    device_id, key = _device(gw)
    assert gw.stop() == 0
    gw.cli("devices", "near-dup", device_id, "off")
    gw.start()
    _ok(upload(gw, key, frames["first"]))
    _ok(upload(gw, key, frames["again"]))
    gw.cli("devices", "near-dup", device_id, "on")  # through the running server's admin API
    _ok(upload(gw, key, frames["again2"]))  # an exempt device's frames were not kept for comparison
    assert upload(gw, key, frames["again3"]).status_code == 409

