"""The forwarder's POST of an image (`CloudClient.upload`) over the shared aiohttp session,
against the fake cloud in each of its failure modes: each ends in the outcome SPEC §4 names."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import xxhash

from gateway.forward.client import DELIVERED, REJECT, RETRY, CloudClient, MultipartUpload, Outcome
from gateway.outbound import Outbound
from tests.conftest import jpeg_bytes


def send(cloud: Any, key: str, image: bytes, timeout_s: float = 10.0, fault: Callable[[], None] | None = None,
         streamed: bool = False) -> Outcome:
    """The outcome of one send, with `fault` armed before it (the image whole, or streamed)."""
    http = Outbound()
    client = CloudClient(http, cloud.url, timeout_s)
    form = MultipartUpload("cam.jpg", "image/jpeg", len(image), b'{"seq": 1}')

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(image), 64 * 1024):
            yield image[i : i + 64 * 1024]

    async def main() -> Outcome:
        try:
            return await client.upload(key, form, pieces() if streamed else image)
        finally:
            await http.aclose()

    if fault:
        fault()
    return asyncio.run(main())


@pytest.fixture
def key(cloud: Any) -> str:
    k = "adk_" + secrets.token_hex(16)
    cloud.add_device(k)
    return k


def test_a_new_image_is_delivered_with_its_bytes_and_metadata(cloud: Any, key: str) -> None:
    image = jpeg_bytes(300_000)
    http = Outbound()
    client = CloudClient(http, cloud.url, 10.0)
    form = MultipartUpload("cam 1.jpg", "image/jpeg", len(image), b'{"seq": 7}')

    async def twice() -> tuple[Outcome, Outcome]:
        first = await client.upload(key, form, bytearray(image))
        again = await client.upload(key, form, image)  # the same bytes again, on the kept-alive connection
        await http.aclose()
        return first, again

    first, again = asyncio.run(twice())
    assert first.kind == DELIVERED and first.status == 201 and first.image_id
    assert again.kind == DELIVERED and again.status == 409 and again.image_id == first.image_id
    assert http.connections_opened == 1
    (rec,) = cloud.stored.values()
    assert rec.xxh3_hex == xxhash.xxh3_128_hexdigest(image)
    assert (rec.filename, rec.content_type, rec.size, rec.metadata_raw) == ("cam 1.jpg", "image/jpeg", len(image),
                                                                           b'{"seq": 7}')


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("status", "retry_after", "kind"), [
    (503, "7", RETRY), (429, None, RETRY), (500, None, RETRY), (401, None, REJECT), (413, None, REJECT),
])
def test_error_answers_are_sorted_by_status(cloud: Any, key: str, status: int, retry_after: str | None,
                                            kind: str, streamed: bool) -> None:
    out = send(cloud, key, jpeg_bytes(20_000), fault=lambda: cloud.fail_next(1, status, retry_after),
               streamed=streamed)
    assert out.kind == kind and out.status == status
    assert out.retry_after_s == (7.0 if retry_after else None)


def test_refused_connections_are_connection_failures(cloud: Any, key: str) -> None:
    cloud.refuse_connections()
    try:
        out = send(cloud, key, jpeg_bytes(20_000))
    finally:
        cloud.accept_connections()
    assert out.kind == RETRY and out.connection_failed and out.error.startswith("cannot connect"), out


def test_a_reset_mid_body_is_a_transport_error_to_retry(cloud: Any, key: str) -> None:
    out = send(cloud, key, jpeg_bytes(1_000_000), fault=lambda: cloud.reset_mid_body(1, read_bytes=100_000))
    assert out.kind == RETRY and out.status is None and not out.connection_failed
    assert out.error.startswith("transport error"), out.error


def test_an_answer_that_does_not_come_is_a_timeout_to_retry(cloud: Any, key: str) -> None:
    started = time.monotonic()
    out = send(cloud, key, jpeg_bytes(20_000), timeout_s=0.5, fault=lambda: cloud.stall(3.0))
    cloud.release()
    assert out.kind == RETRY and out.error.startswith("timed out"), out
    assert time.monotonic() - started < 5.0


def test_a_connection_the_cloud_closed_while_idle_fails_that_attempt_only(cloud: Any, key: str) -> None:
    http = Outbound()
    client = CloudClient(http, cloud.url, 10.0)
    form = MultipartUpload("a.jpg", "image/jpeg", 20_000, None)

    async def main() -> tuple[Outcome, Outcome, Outcome]:
        first = await client.upload(key, form, jpeg_bytes(20_000))
        cloud.refuse_connections()  # also shuts the kept-alive connection down
        cloud.accept_connections()
        await asyncio.sleep(0.1)
        second = await client.upload(key, MultipartUpload("b.jpg", "image/jpeg", 20_000, None), jpeg_bytes(20_000))
        third = await client.upload(key, MultipartUpload("c.jpg", "image/jpeg", 20_000, None), jpeg_bytes(20_000))
        await http.aclose()
        return first, second, third

    first, second, third = asyncio.run(main())
    assert first.kind == DELIVERED
    # The closed connection is noticed before use and replaced (or, in the race where it is not,
    # the attempt is a transport error the forwarder retries): never a hang, never a crash.
    assert second.kind == DELIVERED or (second.kind == RETRY and second.error.startswith("transport error"))
    assert third.kind == DELIVERED


@pytest.mark.parametrize("fault", ["short", "long", "store fails"])
def test_a_body_that_fails_mid_stream_is_never_delivered(cloud: Any, key: str, fault: str) -> None:
    """The store's bytes end early, run long, or the store fails mid-read: the request is dropped
    and the caller gets the body's error at once, nothing delivered."""
    from gateway.errors import ServiceUnavailable
    from gateway.forward.client import LocalBytesChanged

    image = jpeg_bytes(600_000)
    http = Outbound()
    client = CloudClient(http, cloud.url, 10.0)

    async def pieces() -> AsyncIterator[bytes]:
        yield image[:300_000]
        if fault == "store fails":
            raise ServiceUnavailable("Object store unreachable", "reset")
        yield image[300_000 : 500_000 if fault == "short" else None]
        if fault == "long":
            yield b"extra"

    async def main() -> None:
        try:
            await client.upload(key, MultipartUpload("f.jpg", "image/jpeg", len(image), None), pieces())
        finally:
            await http.aclose()

    started = time.monotonic()
    with pytest.raises(ServiceUnavailable if fault == "store fails" else LocalBytesChanged):
        asyncio.run(main())
    assert time.monotonic() - started < 5.0
    assert cloud.stored == {}
