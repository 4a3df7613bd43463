"""The fake cloud itself: contract answers, failure switches, streaming and concurrency."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import xxhash

from tests.support.fakecloud import UPLOAD_PATH, FakeCloud, fake_jpeg
from tests.support.ports import ephemeral_low

KEY_A = "adk_" + "a" * 32
KEY_B = "adk_" + "b" * 32
KEY_PENDING = "adk_" + "c" * 32
KEY_UNKNOWN = "adk_" + "f" * 32
MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    fake = FakeCloud()
    fake.add_device(KEY_A, device_id="dev-a", name="camera A")
    fake.add_device(KEY_B, device_id="dev-b")
    fake.add_device(KEY_PENDING, device_id="dev-p", status="pending")
    with fake:
        yield fake


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def upload(
    client: httpx.Client,
    cloud: FakeCloud,
    data: Any,
    *,
    key: str | None = KEY_A,
    filename: str = "cam.jpg",
    metadata: str | bytes | None = None,
) -> httpx.Response:
    headers = {"X-Device-Key": key} if key else {}
    form = {"metadata": metadata} if metadata is not None else None
    files = {"image": (filename, data, "image/jpeg")}
    return client.post(f"{cloud.url}/device/images/upload", headers=headers, files=files, data=form)


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert isinstance(body["error"]["details"], str)
    return body


def test_upload_201_then_same_bytes_409_with_same_ids(
    cloud: FakeCloud, client: httpx.Client
) -> None:
    data = fake_jpeg(MIB, seed=1)
    first = upload(client, cloud, data, filename="../x/cam 1.jpg")
    assert first.status_code == 201, first.text
    ids = first.json()["data"]
    assert first.json()["success"] is True
    assert re.fullmatch(r"img_[0-9a-f-]{36}", ids["image_id"])
    assert re.fullmatch(r"batch_[0-9a-f-]{36}", ids["batch_id"])
    uuid_hex = ids["image_id"][4:].replace("-", "")
    assert ids["storage_key"] == f"raw-data/{uuid_hex}_cam 1.jpg"

    again = upload(client, cloud, data, key=KEY_B, filename="other.jpg")
    body = assert_error(again, 409, "DUPLICATE_IMAGE")
    assert body["data"] == ids

    digest = xxhash.xxh3_128_hexdigest(data)
    assert list(cloud.stored) == [digest]
    stored = cloud.stored[digest]
    assert (stored.device_id, stored.device_key, stored.size) == ("dev-a", KEY_A, MIB)
    assert (stored.filename, stored.content_type) == ("../x/cam 1.jpg", "image/jpeg")
    assert [(a.status, a.device_id, a.xxh3_hex) for a in cloud.attempts] == [
        (201, "dev-a", digest),
        (409, "dev-b", digest),
    ]
    assert cloud.attempts[1].image_id == ids["image_id"]
    assert cloud.count_requests(UPLOAD_PATH) == 2
    assert cloud.count_requests("/device/images/upload") == 2


def test_metadata_recorded_byte_for_byte(cloud: FakeCloud, client: httpx.Client) -> None:
    raw = '{ "model_id":"m1",  "note": "café ✓",\n "annotations": [] }'
    assert upload(client, cloud, fake_jpeg(100, 1), metadata=raw).status_code == 201
    assert upload(client, cloud, fake_jpeg(100, 2)).status_code == 201
    first, second = cloud.attempts
    assert first.metadata_raw == raw.encode()
    assert second.metadata_raw is None
    bad = upload(client, cloud, fake_jpeg(100, 3), metadata="[1, 2]")
    assert_error(bad, 400, "VALIDATION_ERROR")


def test_key_rules(cloud: FakeCloud, client: httpx.Client) -> None:
    data = fake_jpeg(1000, 7)
    assert_error(upload(client, cloud, data, key=None), 401, "UNAUTHORIZED")
    assert_error(upload(client, cloud, data, key=KEY_UNKNOWN), 401, "INVALID_DEVICE_KEY")
    assert_error(upload(client, cloud, data, key=KEY_PENDING), 403, "DEVICE_NOT_APPROVED")
    cloud.set_key_status(KEY_A, 401)
    assert_error(upload(client, cloud, data, key=KEY_A), 401, "INVALID_DEVICE_KEY")
    assert upload(client, cloud, data, key=KEY_B).status_code == 201
    cloud.set_key_status(KEY_A, None)
    assert_error(upload(client, cloud, data, key=KEY_A), 409, "DUPLICATE_IMAGE")
    assert [a.status for a in cloud.attempts] == [401, 401, 403, 401, 201, 409]
    assert not client.get(f"{cloud.url}/device/self").is_success


def test_validation_errors(cloud: FakeCloud, client: httpx.Client) -> None:
    headers = {"X-Device-Key": KEY_A}
    url = f"{cloud.url}/device/images/upload"
    assert_error(client.post(url, headers=headers, content=b"xx"), 400, "VALIDATION_ERROR")
    assert_error(upload(client, cloud, b""), 400, "VALIDATION_ERROR")
    assert_error(upload(client, cloud, b"GIF89a" + b"0" * 50), 415, "UNSUPPORTED_MEDIA_TYPE")
    no_image = client.post(url, headers=headers, files={"other": ("a.jpg", b"\xff\xd8\xff1")})
    assert_error(no_image, 400, "VALIDATION_ERROR")
    png = b"\x89PNG\r\n\x1a\n" + b"1" * 10
    resp = upload(client, cloud, png, filename="")
    assert resp.status_code == 201
    assert resp.json()["data"]["storage_key"].endswith("_image.png")
    assert not cloud.stored[xxhash.xxh3_128_hexdigest(png)].filename


def test_self_and_checkin(cloud: FakeCloud, client: httpx.Client) -> None:
    me = client.get(f"{cloud.url}/device/self", headers={"X-Device-Key": KEY_A})
    assert me.json() == {
        "success": True,
        "data": {
            "device_id": "dev-a",
            "endpoint_id": "dev-a",
            "organization_id": "org_fake",
            "status": "approved",
            "name": "camera A",
        },
    }
    pending = client.get(f"{cloud.url}/device/self", headers={"X-Device-Key": KEY_PENDING})
    assert_error(pending, 403, "DEVICE_NOT_APPROVED")
    cloud.checkin_actions = [{"type": "reboot"}]
    body = b'{"status": "ok", "metrics": {"cpu": 0.5}}'
    resp = client.post(f"{cloud.url}/device/checkin", headers={"X-Device-Key": KEY_B}, content=body)
    assert resp.json() == {"success": True, "data": {"actions": [{"type": "reboot"}]}}
    assert [(c.device_id, c.body) for c in cloud.checkins] == [("dev-b", body)]


def test_status_mode_and_fail_next(cloud: FakeCloud, client: httpx.Client) -> None:
    cloud.set_mode("status", status=503, retry_after="3")
    for seed in (1, 2):
        resp = upload(client, cloud, fake_jpeg(5000, seed))
        assert_error(resp, 503, "SERVICE_UNAVAILABLE")
        assert resp.headers["Retry-After"] == "3"
    me = client.get(f"{cloud.url}/device/self", headers={"X-Device-Key": KEY_A})
    assert me.status_code == 503
    assert cloud.stored == {}
    cloud.set_mode("normal")
    assert upload(client, cloud, fake_jpeg(5000, 1)).status_code == 201

    cloud.fail_next(2, 429, retry_after="1", path=UPLOAD_PATH)
    assert client.get(f"{cloud.url}/device/self", headers={"X-Device-Key": KEY_A}).is_success
    statuses = [upload(client, cloud, fake_jpeg(5000, 9)).status_code for _ in range(3)]
    assert statuses == [429, 429, 201]
    assert [a.status for a in cloud.attempts] == [503, 503, 201, 429, 429, 201]
    assert cloud.attempts[-2].xxh3_hex == cloud.attempts[-1].xxh3_hex  # failures are hashed too


def test_refuse_then_accept_on_same_port(cloud: FakeCloud, client: httpx.Client) -> None:
    port = cloud.port
    assert upload(client, cloud, fake_jpeg(1000, 1)).status_code == 201  # leaves a pooled conn
    cloud.refuse_connections()
    assert not cloud.accepting
    with pytest.raises(httpx.ConnectError):
        upload(client, cloud, fake_jpeg(1000, 2))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{cloud.url}/device/self", timeout=2)
    cloud.accept_connections()
    assert cloud.port == port
    assert upload(client, cloud, fake_jpeg(1000, 2)).status_code == 201
    assert len(cloud.stored) == 2


def test_reset_mid_body_is_a_transport_error(cloud: FakeCloud, client: httpx.Client) -> None:
    cloud.reset_mid_body()
    with pytest.raises(httpx.TransportError):
        upload(client, cloud, fake_jpeg(4 * MIB, 1))
    (attempt,) = cloud.attempts
    assert attempt.status == 0
    assert 0 < attempt.size < 4 * MIB
    assert attempt.xxh3_hex == ""
    cloud.reset_mid_body(read_bytes=10)
    with pytest.raises(httpx.TransportError):
        upload(client, cloud, fake_jpeg(300, 1))  # small: sent whole, reset while waiting
    assert upload(client, cloud, fake_jpeg(4 * MIB, 1)).status_code == 201  # one-shot
    assert len(cloud.stored) == 1


def test_stall_holds_until_release(cloud: FakeCloud) -> None:
    cloud.stall()
    result: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=10) as c:
            result.append(upload(c, cloud, fake_jpeg(2000, 1)).status_code)

    sender = threading.Thread(target=send)
    sender.start()
    assert cloud.wait_until(lambda c: c.held == 1, timeout=5)
    assert len(cloud.stored) == 1  # processed, only the answer is held
    time.sleep(0.2)
    assert result == []
    cloud.release()
    sender.join(5)
    assert result == [201]
    assert cloud.held == 0


def test_stall_seconds_and_lost_answer_gives_409_on_resend(cloud: FakeCloud) -> None:
    data = fake_jpeg(2000, 5)
    cloud.stall(0.3)
    with httpx.Client(timeout=5) as c:
        started = time.monotonic()
        assert upload(c, cloud, data).status_code == 201
        assert time.monotonic() - started >= 0.3
    cloud.stall()  # answer never comes: the client times out, the cloud kept the image
    with httpx.Client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        upload(c, cloud, fake_jpeg(2000, 6))
    with httpx.Client(timeout=5) as c:
        assert_error(upload(c, cloud, fake_jpeg(2000, 6)), 409, "DUPLICATE_IMAGE")
    cloud.release()


def test_40_mib_upload_is_streamed_without_buffering(cloud: FakeCloud, tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    hasher = xxhash.xxh3_128()
    rng = random.Random(40)
    with path.open("wb") as fh:
        for i in range(40):
            chunk = rng.randbytes(MIB)
            if i == 0:
                chunk = b"\xff\xd8\xff" + chunk[3:]
            hasher.update(chunk)
            fh.write(chunk)
            del chunk
    with httpx.Client(timeout=30) as c, path.open("rb") as fh:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            resp = upload(c, cloud, fh, filename="big.jpg")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert resp.status_code == 201, resp.text
    stored = cloud.stored[hasher.hexdigest()]
    assert stored.size == 40 * MIB
    assert peak - base < 20 * MIB, f"peak grew by {(peak - base) / MIB:.1f} MiB"


def test_chunked_request_body(cloud: FakeCloud, client: httpx.Client) -> None:
    data = fake_jpeg(300_000, 11)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="c.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def parts() -> Iterator[bytes]:
        yield head
        for i in range(0, len(data), 70_000):
            yield data[i : i + 70_000]
        yield tail

    resp = client.post(
        f"{cloud.url}/device/images/upload",
        headers={
            "X-Device-Key": KEY_A,
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        content=parts(),
    )
    assert resp.request.headers.get("Transfer-Encoding") == "chunked"
    assert resp.status_code == 201, resp.text
    assert xxhash.xxh3_128_hexdigest(data) in cloud.stored


def test_30_concurrent_uploads(cloud: FakeCloud) -> None:
    cloud.stall(n=None)  # hold every answer until all 30 are in at once

    def send(seed: int) -> int:
        with httpx.Client(timeout=20) as c:
            resp = upload(c, cloud, fake_jpeg(MIB, seed), key=KEY_A if seed % 2 else KEY_B)
            return resp.status_code

    with ThreadPoolExecutor(30) as pool:
        futures = [pool.submit(send, seed) for seed in range(30)]
        assert cloud.wait_until(lambda c: c.held == 30, timeout=15), cloud.held
        cloud.release()
        statuses = [f.result() for f in futures]
    assert statuses == [201] * 30
    assert len(cloud.stored) == 30
    devices = cloud.stats()["devices"]
    assert len(devices["dev-a"]) == 15
    assert len(devices["dev-b"]) == 15


def test_cli_and_control_api(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# soak keys\n{KEY_A} dev-a\n{KEY_PENDING} dev-p pending\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fakecloud", "--port", "0", "--keys-file", str(keys)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("FAKECLOUD_URL="), line
        url = line.split("=", 1)[1]
        origin = url.removesuffix("/api")

        def send(seed: int) -> httpx.Response:
            files = {"image": ("a.jpg", fake_jpeg(2000, seed), "image/jpeg")}
            headers = {"X-Device-Key": KEY_A}
            return httpx.post(f"{url}/device/images/upload", headers=headers, files=files)

        def mode(**spec: Any) -> None:
            resp = httpx.post(f"{origin}/_control/mode", content=json.dumps(spec))
            assert resp.status_code == 200, resp.text

        assert send(1).status_code == 201
        assert send(1).status_code == 409
        mode(mode="status", status=503, retry_after="2")
        failed = send(2)
        assert (failed.status_code, failed.headers["Retry-After"]) == (503, "2")
        mode(mode="normal")
        assert send(2).status_code == 201

        mode(mode="refuse", seconds=0.5)
        with pytest.raises(httpx.ConnectError):
            send(3)
        deadline = time.monotonic() + 5
        while True:
            try:
                assert send(3).status_code == 201
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        stats = httpx.get(f"{origin}/_control/stats").json()["data"]
        assert (stats["stored"], stats["duplicates"]) == (3, 1)
        assert stats["by_status"]["503"] == 1
        expected = [xxhash.xxh3_128_hexdigest(fake_jpeg(2000, s)) for s in (1, 2, 3)]
        assert stats["devices"] == {"dev-a": expected}
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_cloud_listens_below_the_ephemeral_range_and_gets_its_port_back() -> None:
    """The cloud listens below the kernel's ephemeral range, where no outgoing connection's source
    port can hold its port while it is down (CI once failed with "Address already in use" when
    it came back); it then listens on the same port again."""
    cloud = FakeCloud().start()
    try:
        port = cloud.port
        assert port < ephemeral_low()
        cloud.refuse_connections()
        cloud.accept_connections()
        assert cloud.port == port
        assert httpx.get(f"{cloud.url}/device/self", timeout=5).status_code == 401
    finally:
        cloud.stop()
