"""The hostile-peer corpus: the outbound client against servers that misbehave, on both paths an
image leaves by (the S3 store's PUT and the forwarder's POST to the cloud).

Every case ends in a defined outcome within its deadline, and nothing counts as stored or
delivered unless the server took the request whole and answered 2xx whole.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.config import MinioSettings
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.forward.client import DELIVERED, REJECT, RETRY, CloudClient, MultipartUpload, Outcome
from gateway.outbound import Outbound
from gateway.storage.s3 import S3Store
from tests.support.hostile import HostileServer, behaviours

STEP_S, DEADLINE_S = 1.0, 2.0  # progress timeouts, whole-request deadline
BIG = 4 * 1024 * 1024  # a body still going out when an early answer comes


def image(size: int) -> bytes:
    return b"\xff\xd8\xff" + secrets.token_bytes(size - 3)


async def cloud_post(http: Outbound, port: int, size: int) -> Outcome:
    client = CloudClient(http, f"http://127.0.0.1:{port}/api", STEP_S, DEADLINE_S)
    data = image(size)
    return await client.upload("adk_" + "0" * 32, MultipartUpload("a.jpg", "image/jpeg", size, None), data)


async def s3_put(http: Outbound, port: int, size: int) -> GatewayError | None:
    store = S3Store(MinioSettings(endpoint=f"127.0.0.1:{port}", access_key="ak", secret_key="sk", bucket="bkt"),
                    http=http, connect_s=STEP_S, read_s=STEP_S, deadline_s=DEADLINE_S)
    try:
        await store.put_bytes_async(f"raw-data/{secrets.token_hex(4)}.jpg", image(size), "image/jpeg")
    except GatewayError as exc:
        return exc
    return None


def run(case: str, path: str, go: Callable[[Outbound, HostileServer], Awaitable[list[object]]],
        ) -> tuple[list[object], HostileServer, float]:
    async def main() -> tuple[list[object], HostileServer, float]:
        http = Outbound()
        async with HostileServer(behaviours(path)[case]) as server:
            started = time.monotonic()
            try:
                results = await go(http, server)
            finally:
                await http.aclose()
            return results, server, time.monotonic() - started

    return asyncio.run(main())


def twice(send: Callable[[Outbound, int, int], Awaitable[object]], size: int = 20_000
          ) -> Callable[[Outbound, HostileServer], Awaitable[list[object]]]:
    async def go(http: Outbound, server: HostileServer) -> list[object]:
        first = await send(http, server.port, size)
        await asyncio.sleep(0.2)  # the extra response, if any, has arrived meanwhile
        return [first, await send(http, server.port, size)]
    return go


# -- the forwarder's POST -----------------------------------------------------------------------------


def test_cloud_extra_response_is_never_paired_with_the_next_request() -> None:
    (first, second), server, _ = run("extra response", "cloud", twice(cloud_post))
    assert isinstance(first, Outcome) and isinstance(second, Outcome)
    assert (first.kind, first.status, second.kind, second.status) == (DELIVERED, 201, DELIVERED, 201), (first, second)
    assert server.connections == 2 and server.stored == 2, "the connection with leftover bytes was not reused"


def test_cloud_early_answer_is_judged_by_its_status(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    (out,), server, took = run("early answer and close", "cloud",
                               lambda http, s: _one(cloud_post(http, s.port, BIG)))
    assert isinstance(out, Outcome)
    assert (out.kind, out.status) == (REJECT, 413), out  # a dead letter, not a transport error to retry
    assert server.stored == 0 and took < DEADLINE_S
    assert "socket.send() raised exception" not in caplog.text


def test_cloud_dripping_peer_is_cut_off_at_the_deadline_and_retried() -> None:
    (out,), server, took = run("drip", "cloud", lambda http, s: _one(cloud_post(http, s.port, 20_000)))
    assert isinstance(out, Outcome) and out.kind == RETRY and "timed out" in out.error, out
    assert server.stored == 0
    assert DEADLINE_S - 0.1 <= took < DEADLINE_S + 1.0


def test_cloud_chunked_answer_is_read_and_the_connection_reused() -> None:
    (first, second), server, _ = run("chunked answer", "cloud", twice(cloud_post))
    assert isinstance(first, Outcome) and isinstance(second, Outcome)
    assert first.kind == second.kind == DELIVERED and first.image_id == "img_1", first
    assert server.connections == 1


@pytest.mark.parametrize("case", ["oversized headers", "garbage status line", "close mid-body"])
def test_cloud_broken_answers_are_retried_never_delivered(case: str) -> None:
    (out,), server, took = run(case, "cloud", lambda http, s: _one(cloud_post(http, s.port, 20_000)))
    assert isinstance(out, Outcome) and out.kind == RETRY, out
    assert server.stored == 0 and took < DEADLINE_S + 1.0


def test_cloud_100_continue_then_the_answer() -> None:
    (first, second), server, _ = run("100-continue", "cloud", twice(cloud_post))
    assert isinstance(first, Outcome) and isinstance(second, Outcome)
    assert first.kind == second.kind == DELIVERED and server.stored == 2


# -- the S3 store's PUT -------------------------------------------------------------------------------


def test_s3_extra_response_is_never_paired_with_the_next_request() -> None:
    (first, second), server, _ = run("extra response", "s3", twice(s3_put))
    assert first is None and second is None, (first, second)
    assert server.connections == 2 and server.stored == 2


def test_s3_early_refusal_is_judged_by_its_status(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    (err,), server, took = run("early answer and close", "s3", lambda http, s: _one(s3_put(http, s.port, BIG)))
    assert isinstance(err, ServiceUnavailable) and err.message == "Object store refused the request", err
    assert "AccessDenied" in (err.details or "")
    assert server.requests == 1, "a refusal is not retried"
    assert took < DEADLINE_S and "socket.send() raised exception" not in caplog.text


def test_s3_dripping_peer_is_cut_off_at_the_deadline() -> None:
    (err,), server, took = run("drip", "s3", lambda http, s: _one(s3_put(http, s.port, 20_000)))
    assert isinstance(err, ServiceUnavailable) and "unreachable" in err.message, err
    assert server.stored == 0
    assert DEADLINE_S - 0.1 <= took < DEADLINE_S + 1.0


def test_s3_chunked_answer_is_read_and_the_connection_reused() -> None:
    (first, second), server, _ = run("chunked answer", "s3", twice(s3_put))
    assert first is None and second is None
    assert server.connections == 1


@pytest.mark.parametrize("case", ["oversized headers", "garbage status line", "close mid-body"])
def test_s3_broken_answers_are_never_taken_as_stored(case: str) -> None:
    (err,), server, took = run(case, "s3", lambda http, s: _one(s3_put(http, s.port, 20_000)))
    assert isinstance(err, ServiceUnavailable) and "unreachable" in err.message, err
    assert server.stored == 0
    assert took < 3 * DEADLINE_S


def test_s3_100_continue_then_the_answer() -> None:
    (first, second), server, _ = run("100-continue", "s3", twice(s3_put))
    assert first is None and second is None and server.stored == 2


async def _one(result: Awaitable[object]) -> list[object]:
    return [await result]
