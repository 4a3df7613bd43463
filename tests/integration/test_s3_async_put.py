"""The images' PUT sent from the event loop (presigned by minio, sent by the shared aiohttp session).

Against the real S3 server: signed and UNSIGNED-PAYLOAD bodies land intact over kept-alive
connections, and a wrong secret is refused. Against a scripted HTTP server on loopback: the
request's headers and bytes, and what the blocking client's settings promise for the failures
(a connection the server closed while idle, 503s, a full store, no answer, nobody listening), and
TLS with the certificate checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.config import MinioSettings
from gateway.errors import InsufficientStorage, ServiceUnavailable
from gateway.storage.s3 import S3Store
from tests.e2e.test_tls import make_certificates

# -- against SeaweedFS -----------------------------------------------------------------------------


def s3_store(s3: Any, sign_payload: bool = False, secret: str | None = None) -> S3Store:
    bucket = f"aput-{int(sign_payload)}-{secrets.token_hex(4)}"
    return S3Store(MinioSettings(endpoint=s3.endpoint, access_key=s3.access_key,
                                 secret_key=secret or s3.secret_key, bucket=bucket, sign_payload=sign_payload))


@pytest.mark.parametrize("sign_payload", [False, True], ids=["unsigned-payload", "signed-payload"])
def test_images_round_trip_over_kept_alive_connections(s3: Any, sign_payload: bool) -> None:
    st = s3_store(s3, sign_payload)
    st.ensure_ready()
    images = {f"raw-data/{i}.jpg": secrets.token_bytes(size) for i, size in
              enumerate([1, 100 * 1024, 1024 * 1024 + 7, 5 * 1024 * 1024] + [3000] * 16)}

    async def main() -> None:
        for key, data in images.items():
            await st.put_bytes_async(key, data, "image/jpeg")
        st.close()

    anyio.run(main)
    assert st.http.connections_opened == (0 if sign_payload else 1), "one connection, kept alive, for 20 PUTs"
    for key, data in images.items():
        assert b"".join(st.iter_chunks(key)) == data
        info = st.stat(key)
        assert info is not None and info.size == len(data)


def test_concurrent_puts_share_the_pool(s3: Any) -> None:
    st = s3_store(s3)
    st.ensure_ready()
    rounds = [{f"raw-data/c{r}-{i}.jpg": secrets.token_bytes(50_000 + i) for i in range(16)} for r in range(2)]
    opened = []

    async def main() -> None:
        for images in rounds:  # the second round finds the first round's connections idle
            async with anyio.create_task_group() as tg:
                for key, data in images.items():
                    tg.start_soon(st.put_bytes_async, key, data, "image/jpeg")
            opened.append(st.http.connections_opened)
        st.close()

    anyio.run(main)
    assert opened[0] <= 16 and opened[1] == opened[0], opened
    assert all(b"".join(st.iter_chunks(k)) == v for images in rounds for k, v in images.items())


def test_a_wrong_secret_is_refused_and_stores_nothing(s3: Any) -> None:
    good = s3_store(s3)
    good.ensure_ready()
    bad = s3_store(s3, secret="not-the-secret")
    bad.bucket = good.bucket

    async def main() -> None:
        await bad.put_bytes_async("raw-data/b.jpg", b"\xff\xd8\xff" + secrets.token_bytes(1000), "image/jpeg")

    with pytest.raises(ServiceUnavailable, match="refused") as caught:
        anyio.run(main)
    assert "SignatureDoesNotMatch" in (caught.value.details or ""), caught.value.details
    assert good.stat("raw-data/b.jpg") is None


def test_the_region_comes_from_the_settings_and_gets_are_streamed(s3: Any) -> None:
    st = s3_store(s3)
    st.ensure_ready()
    fresh = s3_store(s3)  # never ran ensure_ready: the region is the settings' (no look-up)
    fresh.bucket = st.bucket
    data = secrets.token_bytes(600_000)

    async def main() -> None:
        await fresh.put_bytes_async("raw-data/r.jpg", data, "image/jpeg")
        got = b"".join([c async for c in await fresh.read_async("raw-data/r.jpg")])
        assert got == data
        with pytest.raises(KeyError):
            await fresh.read_async("raw-data/none.jpg")

    anyio.run(main)
    assert fresh.http.connections_opened == 1
    assert b"".join(st.iter_chunks("raw-data/r.jpg")) == data


# -- against a scripted server ---------------------------------------------------------------------


class Request:
    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.line = lines[0]
        self.headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        self.body = body


Answer = Callable[[Request, int], Awaitable[bytes]]  # (request, its number) -> the bytes to send back


def ok() -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: \"x\"\r\n\r\n"


def error(status: int, code: str, close: bool = False) -> bytes:
    xml = f"<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>says {code}</Message></Error>".encode()
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/xml\r\nContent-Length: {len(xml)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + xml


class Scripted:
    """An HTTP/1.1 server on loopback that answers each PUT as `answer` says."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.requests: list[Request] = []
        self.connections = 0
        self.close_after: set[int] = set()  # request numbers after which the connection is closed
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                req = Request(head[:-4], b"")
                req.body = await reader.readexactly(int(req.headers.get("content-length", "0")))
                self.requests.append(req)
                writer.write(await self.answer(req, len(self.requests)))
                await writer.drain()
                if len(self.requests) in self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def store(self, read_timeout: float = 60.0) -> S3Store:
        return S3Store(MinioSettings(endpoint=f"127.0.0.1:{self.port}", access_key="ak", secret_key="sk",
                                     bucket="bkt", region="us-east-1"), read_s=read_timeout)


@contextlib.asynccontextmanager
async def scripted(answer: Answer) -> AsyncIterator[Scripted]:
    async with Scripted(answer) as server:
        yield server


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


def test_the_request_is_signed_and_carries_the_bytes_as_they_are() -> None:
    data = secrets.token_bytes(200_000)

    async def answer(req: Request, n: int) -> bytes:
        return ok()

    async def main() -> None:
        async with scripted(answer) as server:
            await server.store().put_bytes_async("raw-data/x y.jpg", data, "image/jpeg")
            (req,) = server.requests
            # Presigned: the signature is in the query, the body goes as UNSIGNED-PAYLOAD.
            assert req.line.startswith("PUT /bkt/raw-data/x%20y.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&"), req.line
            assert re.search(r"X-Amz-Credential=ak%2F\d{8}%2Fus-east-1%2Fs3%2Faws4_request&", req.line), req.line
            assert re.search(r"&X-Amz-Signature=[0-9a-f]{64} HTTP/1.1$", req.line), req.line
            assert "authorization" not in req.headers
            assert req.headers["content-length"] == str(len(data))
            assert req.headers["content-type"] == "image/jpeg"
            assert req.body == data

    run(main)


def test_a_signed_payload_carries_its_sha256() -> None:
    data = secrets.token_bytes(5000)

    async def answer(req: Request, n: int) -> bytes:
        return ok()

    async def main() -> None:
        async with scripted(answer) as server:
            st = S3Store(MinioSettings(endpoint=f"127.0.0.1:{server.port}", access_key="ak", secret_key="sk",
                                       bucket="bkt", region="us-east-1", sign_payload=True))
            await st.put_bytes_async("raw-data/s.jpg", data, "image/jpeg")
            assert server.requests[0].headers["x-amz-content-sha256"] == hashlib.sha256(data).hexdigest()

    run(main)


def test_a_connection_the_server_closed_while_idle_is_replaced_at_once() -> None:
    async def answer(req: Request, n: int) -> bytes:
        return ok()

    async def main() -> None:
        async with scripted(answer) as server:
            server.close_after = {1}  # silently, as a keep-alive timeout does
            st = server.store()
            await st.put_bytes_async("raw-data/1.jpg", b"one", "image/jpeg")
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await st.put_bytes_async("raw-data/2.jpg", b"two", "image/jpeg")
            assert time.monotonic() - started < 0.1, "resent at once, not after a back-off"
            assert [r.body for r in server.requests] == [b"one", b"two"]
            assert server.connections == 2

    run(main)


def test_503_is_retried_twice_then_reported() -> None:
    async def flaky(req: Request, n: int) -> bytes:
        return error(503, "SlowDown") if n <= 2 else ok()

    async def down(req: Request, n: int) -> bytes:
        return error(503, "ServiceUnavailable")

    async def main() -> None:
        async with scripted(flaky) as server:
            started = time.monotonic()
            await server.store().put_bytes_async("raw-data/f.jpg", b"f", "image/jpeg")
            assert len(server.requests) == 3
            assert 0.3 <= time.monotonic() - started < 2.0, "backs off 0.1 s, then 0.2 s"
        async with scripted(down) as server:
            with pytest.raises(ServiceUnavailable, match="refused") as caught:
                await server.store().put_bytes_async("raw-data/d.jpg", b"d", "image/jpeg")
            assert "ServiceUnavailable" in (caught.value.details or "")
            assert len(server.requests) == 3

    run(main)


def test_a_full_store_is_507_material_and_not_retried() -> None:
    async def full(req: Request, n: int) -> bytes:
        return error(507, "XMinioStorageFull", close=True)

    async def main() -> None:
        async with scripted(full) as server:
            with pytest.raises(InsufficientStorage):
                await server.store().put_bytes_async("raw-data/full.jpg", b"f", "image/jpeg")
            assert len(server.requests) == 1

    run(main)


def test_other_refusals_name_the_s3_error_code() -> None:
    async def denied(req: Request, n: int) -> bytes:
        return error(403, "AccessDenied")

    async def main() -> None:
        async with scripted(denied) as server:
            st = server.store()
            with pytest.raises(ServiceUnavailable, match="refused") as caught:
                await st.put_bytes_async("raw-data/no.jpg", b"no", "image/jpeg")
            assert caught.value.details == "AccessDenied: says AccessDenied"
            assert len(server.requests) == 1
            with pytest.raises(ServiceUnavailable, match="refused"):
                await st.put_bytes_async("raw-data/no2.jpg", b"no", "image/jpeg")
            assert server.connections == 1, "an error answer leaves the connection usable"

    run(main)


def test_no_answer_within_the_read_timeout_is_503_and_not_retried() -> None:
    async def silent(req: Request, n: int) -> bytes:
        await asyncio.sleep(30)
        return ok()

    async def main() -> None:
        async with scripted(silent) as server:
            st = server.store(read_timeout=0.5)
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="unreachable") as caught:
                await st.put_bytes_async("raw-data/t.jpg", b"t", "image/jpeg")
            assert 0.5 <= time.monotonic() - started < 1.5
            assert "no progress" in (caught.value.details or "")
            assert len(server.requests) == 1

    run(main)


def test_nobody_listening_is_503_after_two_retries() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago, and is closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    st = S3Store(MinioSettings(endpoint=f"127.0.0.1:{port}", access_key="ak", secret_key="sk", bucket="bkt",
                               region="us-east-1"))
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        anyio.run(st.put_bytes_async, "raw-data/n.jpg", b"n", "image/jpeg")
    assert 0.3 <= time.monotonic() - started < 3.0


def test_a_cancelled_put_does_not_leave_its_connection_in_the_pool() -> None:
    async def slow(req: Request, n: int) -> bytes:
        await asyncio.sleep(0.5 if n == 1 else 0)
        return ok()

    async def main() -> None:
        async with scripted(slow) as server:
            st = server.store()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await st.put_bytes_async("raw-data/c.jpg", b"c", "image/jpeg")
            await st.put_bytes_async("raw-data/c.jpg", b"c", "image/jpeg")
            assert server.connections == 2

    run(main)


def test_over_tls_the_store_certificate_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """secure = true: the PUT goes over TLS, and only to a store whose certificate the system trusts."""
    ca_file, cert_file, key_file = make_certificates(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    data = secrets.token_bytes(70_000)

    async def answer(req: Request, n: int) -> bytes:
        return ok()

    async def main() -> None:
        async with Scripted(answer, tls) as server:
            settings = MinioSettings(endpoint=f"127.0.0.1:{server.port}", access_key="ak", secret_key="sk",
                                     bucket="bkt", region="us-east-1", secure=True)
            with pytest.raises(ServiceUnavailable, match="unreachable") as caught:
                await S3Store(settings).put_bytes_async("raw-data/t.jpg", data, "image/jpeg")
            assert "CERTIFICATE_VERIFY_FAILED" in (caught.value.details or ""), caught.value.details
            assert server.requests == []
            monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the site's CA, as the system's
            await S3Store(settings).put_bytes_async("raw-data/t.jpg", data, "image/jpeg")
            (req,) = server.requests
            assert req.body == data and "&X-Amz-Signature=" in req.line

    run(main)
