"""Every row of the SPEC §2 upload table, through real HTTP, on both storage backends (and the
rows that use the default gateway `gw` on the replicated SeaweedFS cluster too).

Each refused request must store nothing: no object, no catalog row, no spool file left.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import xxhash

from tests.conftest import BACKENDS, BACKENDS_AND_CLUSTER, jpeg_bytes, png_bytes, store_env
from tests.support.client import admin_status, multipart_head, raw_request, spool_files, stored_objects, upload
from tests.support.gateway_proc import GatewayProcess

MiB = 1024 * 1024
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def _env(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    return store_env(request, backend)


@pytest.fixture(scope="module", params=BACKENDS_AND_CLUSTER)
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Default policy (dedup across the gateway, reject duplicates)."""
    proc = GatewayProcess(tmp_path_factory.mktemp(f"gw-{request.param}"), _env(request, request.param))
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module", params=BACKENDS)
def gw_lenient(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Accept duplicates, dedup per device, a rate limit and a small pending-bytes budget."""
    env = _env(request, request.param) | {
        "GATEWAY_DEDUP_ON_DUPLICATE": "accept",
        "GATEWAY_DEDUP_SCOPE": "device",
        "GATEWAY_LIMITS_UPLOADS_PER_MINUTE_PER_DEVICE": "4",
        "GATEWAY_LIMITS_MAX_PENDING_BYTES": str(8 * MiB),
        "GATEWAY_SERVER_UPLOAD_SUCCESS_STATUS": "200",
    }
    proc = GatewayProcess(tmp_path_factory.mktemp(f"gwl-{request.param}"), env)
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


class Snapshot:
    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.images = admin_status(gw)["images"]
        self.objects = set(stored_objects(gw))

    def assert_unchanged(self) -> None:
        assert admin_status(self.gw)["images"] == self.images
        assert set(stored_objects(self.gw)) == self.objects
        assert spool_files(self.gw) == []


def assert_error(resp: httpx.Response | tuple[int, dict[str, str], bytes], status: int, code: str) -> dict[str, Any]:
    if isinstance(resp, tuple):
        got_status, _headers, raw = resp
        body = httpx.Response(got_status, content=raw).json()
    else:
        got_status, _headers, body = resp.status_code, dict(resp.headers), resp.json()
    assert got_status == status, body
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], str)
    return body  # type: ignore[no-any-return]


# -- success --------------------------------------------------------------------------------


def test_accepts_jpeg_and_png_durably(gw: GatewayProcess) -> None:
    _, key = gw.add_device("cam-ok")
    for image, name in ((jpeg_bytes(5000), "frame 01.jpg"), (png_bytes(secrets.token_bytes(8)), "shot.png")):
        resp = upload(gw, key, image, filename=name, metadata='{"model_id": "m1", "extra": {"kept": true}}')
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["success"] is True and "error" not in body
        data = body["data"]
        assert re.fullmatch(f"img_{UUID}", data["image_id"])
        assert re.fullmatch(f"batch_{UUID}", data["batch_id"])
        hex_id = uuid.UUID(data["image_id"][4:]).hex
        safe = name.replace(" ", "_")
        assert data["storage_key"] == f"raw-data/{hex_id}_{safe}"
        assert stored_objects(gw)[data["storage_key"]] == image
    assert spool_files(gw) == []


def test_success_status_is_configurable(gw_lenient: GatewayProcess) -> None:
    _, key = gw_lenient.add_device("cam-200")
    resp = upload(gw_lenient, key, jpeg_bytes())
    assert resp.status_code == 200 and resp.json()["success"] is True


def test_curl_upload_as_in_the_readme(gw: GatewayProcess, tmp_path: Path) -> None:
    _, key = gw.add_device("cam-curl")
    img = tmp_path / "part.jpg"
    img.write_bytes(jpeg_bytes(3000))
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{gw.url}/api/device/images/upload", "-H", f"X-Device-Key: {key}",
         "-F", f"image=@{img}", "-F", 'metadata={"model_id":"m","source":"curl"}', "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "201", body
    assert httpx.Response(201, content=body).json()["data"]["storage_key"].endswith("_part.jpg")


# -- 401 / 403 ------------------------------------------------------------------------------


def test_missing_key_is_401_unauthorized(gw: GatewayProcess) -> None:
    snap = Snapshot(gw)
    assert_error(upload(gw, None, jpeg_bytes()), 401, "UNAUTHORIZED")
    snap.assert_unchanged()


def test_unknown_and_revoked_keys_are_401_invalid(gw: GatewayProcess) -> None:
    device_id, key = gw.add_device("cam-revoked")
    snap = Snapshot(gw)
    assert_error(upload(gw, "adk_" + "0" * 32, jpeg_bytes()), 401, "INVALID_DEVICE_KEY")
    assert_error(upload(gw, "not-a-key", jpeg_bytes()), 401, "INVALID_DEVICE_KEY")
    gw.cli("devices", "revoke", device_id)
    assert_error(upload(gw, key, jpeg_bytes()), 401, "INVALID_DEVICE_KEY")
    snap.assert_unchanged()


@pytest.mark.parametrize("status", ["pending", "rejected"])
def test_unapproved_device_is_403(gw: GatewayProcess, status: str) -> None:
    device_id, key = gw.add_device(f"cam-{status}", status="pending")
    if status == "rejected":
        gw.cli("devices", "reject", device_id)
    snap = Snapshot(gw)
    assert_error(upload(gw, key, jpeg_bytes()), 403, "DEVICE_NOT_APPROVED")
    snap.assert_unchanged()
    gw.cli("devices", "approve", key)  # by key works too
    assert upload(gw, key, jpeg_bytes()).status_code == 201


# -- 400 ------------------------------------------------------------------------------------


def _bad_requests(gw: GatewayProcess, key: str) -> list[Callable[[], httpx.Response]]:
    url = f"{gw.url}/api/device/images/upload"
    hdr = {"X-Device-Key": key}
    return [
        lambda: httpx.post(url, json={"image": "x"}, headers=hdr),  # not multipart
        lambda: httpx.post(url, content=b"x", headers=hdr | {"Content-Type": "multipart/form-data"}),  # no boundary
        lambda: upload(gw, key, None, metadata='{"model_id": "m"}'),  # no image part
        lambda: upload(gw, key, b""),  # empty file
        lambda: upload(gw, key, jpeg_bytes(), metadata="[1, 2]"),  # metadata not an object
        lambda: upload(gw, key, jpeg_bytes(), metadata="{nope"),  # metadata not JSON
        lambda: upload(gw, key, jpeg_bytes(), metadata='{"annotations": [{"class_value": "a", "type": "bbox",'
                                                       ' "geometry": [0.5, 0.5, 1.2, 0.1]}]}'),  # bad annotation
        lambda: upload(gw, key, jpeg_bytes(), metadata='{"timestamp": "not a time"}'),
    ]


def test_validation_errors_are_400_and_store_nothing(gw: GatewayProcess) -> None:
    _, key = gw.add_device("cam-400")
    snap = Snapshot(gw)
    for send in _bad_requests(gw, key):
        assert_error(send(), 400, "VALIDATION_ERROR")
    snap.assert_unchanged()


# -- 413 ------------------------------------------------------------------------------------


def test_image_over_50_mib_is_413_while_streaming(gw: GatewayProcess) -> None:
    _, key = gw.add_device("cam-413")
    snap = Snapshot(gw)
    size = 50 * MiB + 1
    head, tail = multipart_head(f"{gw.url}/api/device/images/upload", key, "b0undary", size)
    sent = [0]

    def chunks() -> Iterator[bytes]:
        block = b"\xff\xd8\xff" + secrets.token_bytes(MiB - 3)
        left = size
        while left > 0:
            piece = block[: min(MiB, left)]
            left -= len(piece)
            sent[0] += len(piece)
            yield piece
        yield tail

    resp = raw_request(f"{gw.url}/api/device/images/upload", head, chunks())
    assert_error(resp, 413, "PAYLOAD_TOO_LARGE")
    snap.assert_unchanged()
    # A declared Content-Length over the limit is refused before any body byte is read.
    head2, _ = multipart_head(f"{gw.url}/api/device/images/upload", key, "b0undary", 200 * MiB)
    assert_error(raw_request(f"{gw.url}/api/device/images/upload", head2, iter(())), 413, "PAYLOAD_TOO_LARGE")
    snap.assert_unchanged()


# -- 415 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"GIF89a" + b"\x00" * 100, b"%PDF-1.7 not an image", b"\xff\xd8", b"\x89PNG\r\n\x1a", b"hello world" * 100],
)
def test_non_jpeg_png_bytes_are_415_whatever_the_declared_type(gw: GatewayProcess, payload: bytes) -> None:
    _, key = gw.add_device("cam-415")
    snap = Snapshot(gw)
    assert_error(upload(gw, key, payload, filename="x.jpg", content_type="image/jpeg"), 415,
                 "UNSUPPORTED_MEDIA_TYPE")
    snap.assert_unchanged()


# -- 409 and duplicate policies ---------------------------------------------------------------


def test_duplicate_is_409_with_the_existing_ids(gw: GatewayProcess) -> None:
    _, key_a = gw.add_device("cam-dup-a")
    _, key_b = gw.add_device("cam-dup-b")
    image = jpeg_bytes(4096)
    first = upload(gw, key_a, image).json()["data"]
    snap = Snapshot(gw)
    for key in (key_a, key_b):  # scope = gateway: another device's copy is a duplicate too
        body = assert_error(upload(gw, key, image, filename="other.jpg"), 409, "DUPLICATE_IMAGE")
        assert body["data"] == first
    snap.assert_unchanged()


def test_accept_policy_returns_existing_ids_and_device_scope(gw_lenient: GatewayProcess) -> None:
    _, key_a = gw_lenient.add_device("cam-acc-a")
    _, key_b = gw_lenient.add_device("cam-acc-b")
    image = jpeg_bytes(4096)
    first = upload(gw_lenient, key_a, image)
    assert first.status_code == 200
    snap = Snapshot(gw_lenient)
    again = upload(gw_lenient, key_a, image)
    assert again.status_code == 200 and again.json()["data"] == first.json()["data"]
    snap.assert_unchanged()
    other = upload(gw_lenient, key_b, image)  # scope = device: a different device stores its own copy
    assert other.status_code == 200 and other.json()["data"]["image_id"] != first.json()["data"]["image_id"]


def test_concurrent_identical_uploads_store_exactly_one(gw: GatewayProcess) -> None:
    import concurrent.futures

    _, key = gw.add_device("cam-race")
    image = jpeg_bytes(256 * 1024)
    before = admin_status(gw)["images"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: upload(gw, key, image), range(8)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [201] + [409] * 7, statuses
    ids = {r.json()["data"]["image_id"] for r in results}
    assert len(ids) == 1
    assert admin_status(gw)["images"] == before + 1
    digest = xxhash.xxh3_128_hexdigest(image)
    assert sum(1 for v in stored_objects(gw).values() if xxhash.xxh3_128_hexdigest(v) == digest) == 1


# -- 429 ------------------------------------------------------------------------------------


def test_rate_limit_is_429_with_retry_after_per_device(gw_lenient: GatewayProcess) -> None:
    _, chatty = gw_lenient.add_device("cam-chatty")
    _, quiet = gw_lenient.add_device("cam-quiet")
    for _ in range(4):
        assert upload(gw_lenient, chatty, jpeg_bytes()).status_code == 200
    snap = Snapshot(gw_lenient)
    resp = upload(gw_lenient, chatty, jpeg_bytes())
    assert_error(resp, 429, "RATE_LIMITED")
    assert int(resp.headers["retry-after"]) >= 1
    snap.assert_unchanged()
    assert upload(gw_lenient, quiet, jpeg_bytes()).status_code == 200  # others are not starved


# -- 507 ------------------------------------------------------------------------------------


def test_pending_bytes_budget_is_507(gw_lenient: GatewayProcess) -> None:
    _, key = gw_lenient.add_device("cam-507")
    snap = Snapshot(gw_lenient)
    resp = upload(gw_lenient, key, jpeg_bytes(9 * MiB))
    assert_error(resp, 507, "INSUFFICIENT_STORAGE")
    assert int(resp.headers["retry-after"]) > 0
    snap.assert_unchanged()


@pytest.mark.parametrize("backend", BACKENDS)
def test_disk_floor_is_507(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> None:
    proc = GatewayProcess(tmp_path / "g", _env(request, backend) | {
        "GATEWAY_LIMITS_MIN_FREE_DISK_BYTES": str(shutil.disk_usage(tmp_path).total * 2)})
    proc.start()
    try:
        _, key = proc.add_device("cam-full")
        snap = Snapshot(proc)
        assert_error(upload(proc, key, jpeg_bytes()), 507, "INSUFFICIENT_STORAGE")
        snap.assert_unchanged()
    finally:
        assert proc.stop() == 0


# -- 503 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_store_is_503_with_retry_after(request: pytest.FixtureRequest, tmp_path: Path,
                                                   backend: str) -> None:
    from tests.support.gateway_proc import free_port

    env = _env(request, backend)
    if backend == "minio":
        env["GATEWAY_MINIO_ENDPOINT"] = f"127.0.0.1:{free_port()}"  # nothing listens there
    proc = GatewayProcess(tmp_path / "g", env)
    if backend == "folder":
        (proc.workdir / "data").mkdir(parents=True)
        (proc.workdir / "data" / "objects").write_text("not a folder")  # the store cannot work
    proc.start(wait_ready=False)
    try:
        deadline_ok = False
        for _ in range(100):
            try:
                httpx.get(f"{proc.url}/api/health", timeout=1).raise_for_status()
                deadline_ok = True
                break
            except httpx.HTTPError:
                import time

                time.sleep(0.1)
        assert deadline_ok, proc.log_tail()
        ready = httpx.get(f"{proc.url}/api/ready")
        assert_error(ready, 503, "SERVICE_UNAVAILABLE")
        _, key = proc.add_device("cam-503")
        resp = upload(proc, key, jpeg_bytes())
        assert_error(resp, 503, "SERVICE_UNAVAILABLE")
        assert int(resp.headers["retry-after"]) > 0
        assert admin_status(proc)["images"] == 0
        assert spool_files(proc) == []
    finally:
        assert proc.stop() == 0
