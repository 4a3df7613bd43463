"""The forwarder's POST of an image held in memory, sent from the event loop (`CloudClient.upload`),
against the fake cloud in each of its failure modes: the same outcome as the blocking send in a
thread (`upload_blocking`), which the forwarder still uses for images it must stream."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import xxhash

from gateway.forward.client import DELIVERED, REJECT, RETRY, CloudClient, MultipartUpload, Outcome
from tests.conftest import jpeg_bytes


def both(cloud: Any, key: str, image: bytes, timeout_s: float = 10.0,
         fault: Callable[[], None] | None = None) -> tuple[Outcome, Outcome]:
    """The outcome of one send each way, with `fault` armed before each."""
    client = CloudClient(cloud.url, timeout_s, 4)
    form = MultipartUpload("cam.jpg", "image/jpeg", len(image), b'{"seq": 1}')
    try:
        if fault:
            fault()
        fast = asyncio.run(client.upload(key, form, image))
        if fault:
            fault()
        slow = client.upload_blocking(key, form, image, threading.Event())
    finally:
        asyncio.run(client.aclose())
    return fast, slow


@pytest.fixture
def key(cloud: Any) -> str:
    k = "adk_" + secrets.token_hex(16)
    cloud.add_device(k)
    return k


def same(fast: Outcome, slow: Outcome) -> None:
    assert (fast.kind, fast.status, fast.retry_after_s, fast.connection_failed) == (
        slow.kind, slow.status, slow.retry_after_s, slow.connection_failed), (fast, slow)


def test_a_new_image_is_delivered_with_its_bytes_and_metadata(cloud: Any, key: str) -> None:
    image = jpeg_bytes(300_000)
    client = CloudClient(cloud.url, 10.0, 4)
    form = MultipartUpload("cam 1.jpg", "image/jpeg", len(image), b'{"seq": 7}')

    async def twice() -> tuple[Outcome, Outcome]:
        first = await client.upload(key, form, bytearray(image))
        again = await client.upload(key, form, image)  # the same bytes again, on the kept-alive connection
        await client.aclose()
        return first, again

    first, again = asyncio.run(twice())
    assert first.kind == DELIVERED and first.status == 201 and first.image_id
    assert again.kind == DELIVERED and again.status == 409 and again.image_id == first.image_id
    assert client.fast.connections_opened == 1
    (rec,) = cloud.stored.values()
    assert rec.xxh3_hex == xxhash.xxh3_128_hexdigest(image)
    assert (rec.filename, rec.content_type, rec.size, rec.metadata_raw) == ("cam 1.jpg", "image/jpeg", len(image),
                                                                           b'{"seq": 7}')


@pytest.mark.parametrize(("status", "retry_after", "kind"), [
    (503, "7", RETRY), (429, None, RETRY), (500, None, RETRY), (401, None, REJECT), (413, None, REJECT),
])
def test_error_answers_are_sorted_alike(cloud: Any, key: str, status: int, retry_after: str | None,
                                        kind: str) -> None:
    fast, slow = both(cloud, key, jpeg_bytes(20_000),
                      fault=lambda: cloud.fail_next(1, status, retry_after))
    same(fast, slow)
    assert fast.kind == kind and fast.status == status
    assert fast.retry_after_s == (7.0 if retry_after else None)


def test_refused_connections_are_connection_failures(cloud: Any, key: str) -> None:
    cloud.refuse_connections()
    try:
        fast, slow = both(cloud, key, jpeg_bytes(20_000))
    finally:
        cloud.accept_connections()
    same(fast, slow)
    assert fast.kind == RETRY and fast.connection_failed and fast.error.startswith("cannot connect")


def test_a_reset_mid_body_is_a_transport_error_to_retry(cloud: Any, key: str) -> None:
    fast, slow = both(cloud, key, jpeg_bytes(1_000_000), fault=lambda: cloud.reset_mid_body(1, read_bytes=100_000))
    same(fast, slow)
    assert fast.kind == RETRY and fast.status is None and not fast.connection_failed
    assert fast.error.startswith("transport error"), fast.error


def test_an_answer_that_does_not_come_is_a_timeout_to_retry(cloud: Any, key: str) -> None:
    started = time.monotonic()
    fast, slow = both(cloud, key, jpeg_bytes(20_000), timeout_s=0.5, fault=lambda: cloud.stall(3.0))
    cloud.release()
    same(fast, slow)
    assert fast.kind == RETRY and fast.error == "timed out: ReadTimeout"
    assert time.monotonic() - started < 5.0


def test_a_connection_the_cloud_closed_while_idle_fails_that_attempt_only(cloud: Any, key: str) -> None:
    client = CloudClient(cloud.url, 10.0, 4)
    form = MultipartUpload("a.jpg", "image/jpeg", 20_000, None)

    async def main() -> tuple[Outcome, Outcome, Outcome]:
        first = await client.upload(key, form, jpeg_bytes(20_000))
        cloud.refuse_connections()  # also shuts the kept-alive connection down
        cloud.accept_connections()
        await asyncio.sleep(0.1)
        second = await client.upload(key, MultipartUpload("b.jpg", "image/jpeg", 20_000, None), jpeg_bytes(20_000))
        third = await client.upload(key, MultipartUpload("c.jpg", "image/jpeg", 20_000, None), jpeg_bytes(20_000))
        await client.aclose()
        return first, second, third

    first, second, third = asyncio.run(main())
    assert first.kind == DELIVERED
    # The closed connection is noticed before use and replaced (or, in the race where it is not,
    # the attempt is a transport error the forwarder retries): never a hang, never a crash.
    assert second.kind == DELIVERED or (second.kind == RETRY and second.error.startswith("transport error"))
    assert third.kind == DELIVERED
