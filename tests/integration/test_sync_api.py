"""The sync API (SPEC §5) through real HTTP on both backends: tokens, listing, manifests, image
bytes and acks, every error in the envelope.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import xxhash
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.config import DataSettings, KeySettings, LimitSettings, Settings
from tests.conftest import BACKENDS, jpeg_bytes
from tests.support.client import upload
from tests.support.gateway_proc import SYNC_TOKEN, GatewayProcess, s3_env

AUTH = {"Authorization": f"Bearer {SYNC_TOKEN}"}


class Drainable:
    """A gateway (forwarding off, batches of 5) holding one forwarded batch of 5 and one collecting of 2."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        _, key = gw.add_device("cam-sync")
        self.images: dict[str, tuple[bytes, str, str]] = {}
        self.batch_of: dict[str, str] = {}
        for n in range(7):
            image = jpeg_bytes(3000 + n)
            metadata = json.dumps({"source": "line-3", "n": n})
            data = upload(gw, key, image, filename=f"part {n}.jpg", metadata=metadata).json()["data"]
            self.images[data["image_id"]] = (image, f"part_{n}.jpg", metadata)
            self.batch_of[data["image_id"]] = data["batch_id"]
        ordered = list(self.batch_of.values())
        self.full, self.open = ordered[0], ordered[-1]
        deadline = time.monotonic() + 30
        while self.state(self.full) != "forwarded":
            assert time.monotonic() < deadline, "sealed batch never became forwarded"
            time.sleep(0.1)

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=f"{self.gw.url}/api/sync", headers=AUTH if headers is None else headers,
                            timeout=30)

    def state(self, batch_id: str) -> str:
        with self.client() as c:
            return c.get(f"/batches/{batch_id}").json()["data"]["batch"]["state"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=BACKENDS)
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drainable]:
    env = {"GATEWAY_STORAGE_BACKEND": "folder"} if request.param == "folder" else s3_env(request.getfixturevalue("s3"))
    # timeout_s 60: the sealer ticks every 3 s (moving sealed batches to forwarded), and the
    # collecting batch stays collecting for the few seconds this module takes.
    proc = GatewayProcess(tmp_path_factory.mktemp(f"sync-{request.param}"),
                          env | {"GATEWAY_BATCHES_MAX_IMAGES": "5", "GATEWAY_BATCHES_TIMEOUT_S": "60"})
    proc.start()
    yield Drainable(proc)
    assert proc.stop() == 0, proc.log_tail()


def assert_envelope_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["success"] is False and body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], str)
    return body  # type: ignore[no-any-return]


def sync_routes(gw: Drainable) -> list[tuple[str, str]]:
    image_id = next(iter(gw.images))
    return [
        ("GET", "/batches"),
        ("GET", "/batches?state=forwarded&limit=5"),
        ("GET", f"/batches/{gw.full}"),
        ("GET", f"/batches/{gw.full}/manifest.parquet"),
        ("GET", f"/images/{image_id}"),
        ("GET", "/images/img_does-not-exist"),
        ("POST", f"/batches/{gw.full}/ack"),
    ]


def test_every_sync_route_wants_the_token(gw: Drainable) -> None:
    bad = [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Bearer {SYNC_TOKEN}x"},
           {"Authorization": f"Basic {SYNC_TOKEN}"}, {"Authorization": "Bearer"}, {"X-Device-Key": SYNC_TOKEN}]
    for method, path in sync_routes(gw):
        for headers in bad:
            with gw.client(headers) as c:
                assert_envelope_error(c.request(method, path), 401, "UNAUTHORIZED")
    assert gw.state(gw.full) == "forwarded"  # the refused acks changed nothing


def test_list_with_state_paging_and_meta(gw: Drainable) -> None:
    with gw.client() as c:
        body = c.get("/batches").json()
        assert body["success"] is True
        assert body["meta"] == {"total": 2, "limit": 100, "offset": 0}
        assert [b["batch_id"] for b in body["data"]] == [gw.full, gw.open]  # oldest first
        assert [(b["state"], b["image_count"]) for b in body["data"]] == [("forwarded", 5), ("collecting", 2)]

        body = c.get("/batches", params={"state": "forwarded"}).json()
        assert [b["batch_id"] for b in body["data"]] == [gw.full] and body["meta"]["total"] == 1
        page = c.get("/batches", params={"limit": 1, "offset": 1}).json()
        assert [b["batch_id"] for b in page["data"]] == [gw.open]
        assert page["meta"] == {"total": 2, "limit": 1, "offset": 1}
        assert c.get("/batches", params={"state": "drained"}).json()["data"] == []

        for params in ({"state": "lost"}, {"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
            assert_envelope_error(c.get("/batches", params=params), 400, "VALIDATION_ERROR")


def test_one_batch_with_its_manifest_as_json(gw: Drainable) -> None:
    with gw.client() as c:
        data = c.get(f"/batches/{gw.full}").json()["data"]
        assert_envelope_error(c.get("/batches/batch_nope"), 404, "NOT_FOUND")
    assert data["batch"]["batch_id"] == gw.full and data["batch"]["image_count"] == 5
    assert data["batch"]["total_bytes"] == sum(len(gw.images[r["image_id"]][0]) for r in data["manifest"])
    ids = [i for i, b in gw.batch_of.items() if b == gw.full]
    assert [r["image_id"] for r in data["manifest"]] == ids  # upload order
    for row in data["manifest"]:
        image, filename, metadata = gw.images[row["image_id"]]
        assert row["xxh3_128"] == xxhash.xxh3_128_hexdigest(image)
        assert (row["filename"], row["size"], row["content_type"], row["metadata"]) == (
            filename, len(image), "image/jpeg", metadata)
        assert row["batch_id"] == gw.full and row["cloud_image_id"] is None
        assert isinstance(row["received_at"], float)


def test_manifest_parquet_only_once_sealed(gw: Drainable) -> None:
    with gw.client() as c:
        resp = c.get(f"/batches/{gw.full}/manifest.parquet")
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/vnd.apache.parquet"
        assert resp.content.startswith(b"PAR1")
        assert resp.headers["x-content-xxh3-128"] == xxhash.xxh3_128_hexdigest(resp.content)
        assert_envelope_error(c.get(f"/batches/{gw.open}/manifest.parquet"), 409, "CONFLICT")
        assert_envelope_error(c.get("/batches/batch_nope/manifest.parquet"), 404, "NOT_FOUND")


def test_image_bytes_streamed_with_length_type_and_hash(gw: Drainable) -> None:
    with gw.client() as c:
        for image_id, (image, _, _) in gw.images.items():
            resp = c.get(f"/images/{image_id}")
            assert resp.status_code == 200
            assert resp.content == image
            assert resp.headers["content-length"] == str(len(image))
            assert resp.headers["content-type"] == "image/jpeg"
            assert resp.headers["x-content-xxh3-128"] == xxhash.xxh3_128_hexdigest(image)
        body = assert_envelope_error(c.get("/images/img_00000000-0000-0000-0000-000000000000"), 404, "NOT_FOUND")
        assert "data" not in body


def acks(gw: Drainable) -> dict[str, float]:
    text = httpx.get(f"{gw.gw.url}/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        if line.startswith("acusight_gateway_sync_acks_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = float(line.rsplit(" ", 1)[1])
    return found


def test_ack_is_idempotent_and_refuses_what_is_not_forwarded(gw: Drainable) -> None:
    before = acks(gw)
    with gw.client() as c:
        assert_envelope_error(c.post(f"/batches/{gw.open}/ack"), 409, "CONFLICT")
        assert_envelope_error(c.post("/batches/batch_nope/ack"), 404, "NOT_FOUND")
        first = c.post(f"/batches/{gw.full}/ack")
        assert first.status_code == 200
        batch = first.json()["data"]
        assert batch["state"] == "drained" and batch["drained_at"] is not None
        time.sleep(0.05)
        second = c.post(f"/batches/{gw.full}/ack")
        assert second.status_code == 200 and second.json() == first.json()
        assert c.get(f"/batches/{gw.full}").json()["data"]["batch"] == batch
        assert c.get("/batches", params={"state": "forwarded"}).json()["data"] == []
        assert c.get(f"/batches/{gw.open}").json()["data"]["batch"]["state"] == "collecting"
        # Drained batches still serve their images (until the retention setting removes them).
        image_id = next(i for i, b in gw.batch_of.items() if b == gw.full)
        assert c.get(f"/images/{image_id}").content == gw.images[image_id][0]
    after = acks(gw)
    assert after["drained"] - before.get("drained", 0) == 1
    assert after["already_drained"] - before.get("already_drained", 0) == 1
    assert after["refused"] - before.get("refused", 0) == 2


def test_sync_api_off_is_403(tmp_path: Path) -> None:
    settings = Settings(data=DataSettings(dir=str(tmp_path / "data")),
                        keys=KeySettings(secret_file=str(tmp_path / "secret.key")),
                        limits=LimitSettings(min_free_disk_bytes=0))
    assert settings.sync.token == ""
    with TestClient(create_app(settings)) as client:
        for headers in ({}, AUTH):
            resp = client.get("/api/sync/batches", headers=headers)
            assert resp.status_code == 403 and resp.json()["error"]["code"] == "FORBIDDEN"
