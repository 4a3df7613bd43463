"""PUT of an in-memory image to the S3 store from the event loop, without a worker thread.

The `minio` client blocks, so each upload used to hop to a worker thread for its PUT and back.
Under load a hop waits for a core and for the GIL: with 100 KiB images at 8 uploads in flight,
getting into the thread took 3.3 ms of a 17.6 ms upload. Here the request is still the `minio`
client's own (its URL, headers and SigV4 signature, `_Minio` in `s3.py`); only its bytes travel
on the event loop, over a pool of keep-alive connections, with h11 for the HTTP/1.1 framing.
Spooled images, too big for memory, still go through `minio` in a thread.

Retries follow the blocking client's urllib3 settings: a connection that fails or a 502/503/504
answer is tried twice more, 0.1 s and 0.2 s later (a PUT of the same bytes under the same key is
idempotent); an answer that does not come within the read timeout is not retried. A request on
a kept-alive connection that the server had closed meanwhile is resent at once on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, cast

import h11
from minio.signer import sign_v4_s3

from gateway.errors import InsufficientStorage, ServiceUnavailable

if TYPE_CHECKING:
    from minio import Minio

FULL_CODES = frozenset({"XMinioStorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded", "StorageFull"})
_RETRY_STATUS = frozenset({502, 503, 504})
_RETRIES = 2
_BACKOFF_S = 0.1
_READ = 64 * 1024
_MAX_ERROR_BODY = 64 * 1024


class RegionUnknown(Exception):
    """The bucket's region is not known yet (`ensure_ready` learns it): use the blocking client."""


class _Refused(Exception):
    """The store answered with a status other than 2xx."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code or f'HTTP {status}'}: {message}" if message else code or f"HTTP {status}")
        self.status, self.code = status, code


class _ReadTimeout(Exception):
    """No answer within the read timeout."""


class _Stale(Exception):
    """A kept-alive connection had been closed by the server: the request never reached it."""


class _Connection:
    __slots__ = ("http", "reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.http = h11.Connection(h11.CLIENT)
        self.reused = False

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class AsyncPut:
    """PUTs bytes under keys of one bucket, as requests signed by `client`, on the running loop."""

    def __init__(self, client: Minio, bucket: str, *, connect_timeout: float, read_timeout: float,
                 max_idle: int) -> None:
        self.client = client
        self.bucket = bucket
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._ssl = ssl.create_default_context() if client._base_url.is_https else None
        self._idle: list[_Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections_opened = 0  # for tests and the curious: keep-alive at work

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`; raises `ServiceUnavailable` or `InsufficientStorage` as the
        blocking client's callers expect, and `RegionUnknown` before the bucket's region is known."""
        for attempt in range(_RETRIES + 1):
            try:
                await self._put_once(key, data, content_type)
                return
            except _Refused as exc:
                if exc.status not in _RETRY_STATUS or attempt == _RETRIES:
                    raise _store_error(exc) from None
            except _ReadTimeout:
                raise ServiceUnavailable("Object store unreachable",
                                         f"no answer within {self.read_timeout:g} s") from None
            except (OSError, TimeoutError, h11.ProtocolError) as exc:
                if attempt == _RETRIES:
                    raise ServiceUnavailable("Object store unreachable",
                                             (str(exc) or type(exc).__name__)[:200]) from None
            await asyncio.sleep(_BACKOFF_S * 2**attempt)

    async def _put_once(self, key: str, data: bytes, content_type: str) -> None:
        client = self.client
        region = client._base_url.region or client._region_map.get(self.bucket)
        if not region:
            raise RegionUnknown(self.bucket)
        creds = client._provider.retrieve() if client._provider else None
        url = client._base_url.build(method="PUT", region=region, bucket_name=self.bucket, object_name=key)
        headers, date = client._build_headers(url.netloc, {"Content-Type": content_type}, data, creds)
        headers["Content-Length"] = str(len(data))
        if creds:
            headers = sign_v4_s3(method="PUT", url=url, region=region, headers=headers, credentials=creds,
                                 content_sha256=cast(str, headers["x-amz-content-sha256"]), date=date)
        target = url.path + ("?" + url.query if url.query else "")
        fields = [(k, v) for k, vs in headers.items() for v in ([vs] if isinstance(vs, str) else vs)]
        request = h11.Request(method="PUT", target=target, headers=fields)
        host, port = url.hostname or "", url.port or (443 if self._ssl else 80)
        while True:
            conn = await self._connection(host, port)
            try:
                status, content_type_back, body = await self._exchange(conn, request, data)
            except _Stale:
                conn.close()
                continue  # closed by the server while idle: nothing was sent, so send it afresh
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            break
        if status // 100 != 2:
            code, message = _s3_error(body) if "xml" in content_type_back else ("", "")
            raise _Refused(status, code, message)

    async def _connection(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._idle, self._loop = [], loop
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=self._ssl, server_hostname=host if self._ssl else None, limit=_READ)
        self.connections_opened += 1
        return _Connection(reader, writer)

    def _release(self, conn: _Connection) -> None:
        http = conn.http
        if http.our_state is h11.DONE and http.their_state is h11.DONE and len(self._idle) < self.max_idle:
            http.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.close()

    async def _exchange(self, conn: _Connection, request: h11.Request, data: bytes) -> tuple[int, str, bytes]:
        """Send the request and read the whole answer: (status, content type, body)."""
        http = conn.http
        out = [*(http.send_with_data_passthrough(request) or ()),
               *(http.send_with_data_passthrough(h11.Data(data=data)) or ()),
               *(http.send_with_data_passthrough(h11.EndOfMessage()) or ())]
        answered = False
        status, content_type, body = 0, "", bytearray()
        try:
            async with asyncio.timeout(self.read_timeout) as deadline:
                conn.writer.writelines(out)
                await conn.writer.drain()
                while True:
                    event = http.next_event()
                    if event is h11.NEED_DATA:
                        chunk = await conn.reader.read(_READ)
                        if not chunk and not answered and conn.reused:
                            raise _Stale()
                        answered = answered or bool(chunk)
                        http.receive_data(chunk)
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        content_type = next((v.decode("latin-1") for k, v in event.headers if k == b"content-type"), "")
                    elif isinstance(event, h11.Data):
                        if len(body) < _MAX_ERROR_BODY:
                            body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        return status, content_type, bytes(body)
                    elif isinstance(event, h11.ConnectionClosed):
                        raise ConnectionResetError("the store closed the connection")
        except TimeoutError:
            if deadline.expired():
                raise _ReadTimeout() from None
            raise
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not answered and conn.reused:
                raise _Stale() from exc
            raise

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _s3_error(body: bytes) -> tuple[str, str]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


def _store_error(exc: _Refused) -> Exception:
    if exc.code in FULL_CODES:
        return InsufficientStorage("Object store is full", exc.code)
    return ServiceUnavailable("Object store refused the request", str(exc)[:200])
