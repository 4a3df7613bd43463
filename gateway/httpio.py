"""A small HTTP/1.1 client on the event loop: kept-alive connections, h11 for the framing.

The hot paths send one whole body and read one short answer: the images' PUTs to the S3 store
(`storage/s3put.py`) and the forwarder's POSTs of cached images to the cloud. Done from the event
loop they need no worker thread, so no hand-over to a thread and back per request, each of which
waits for a core and for the GIL under load. (httpx's async stack costs several times as much CPU
per request: NOTES, and `forward/client.py`.)

Timeouts are about progress, as urllib3's are: connecting must finish within `connect_timeout`,
and each step after it (a piece of the body leaving, a piece of the answer arriving) within
`read_timeout`, so a big body on a slow link is fine while a silent peer is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from typing import cast

import h11

_READ = 64 * 1024
_PIECE = 256 * 1024  # the body is handed to the socket this much at a time, each within the timeout


class ConnectFailed(Exception):
    """No connection (refused, unreachable, or not within the connect timeout): nothing was sent."""


class NoProgress(Exception):
    """The peer took longer than the read timeout to take the body or to answer."""

    def __init__(self, status: int) -> None:
        super().__init__(f"no progress within the read timeout (status {status or 'not yet known'})")
        self.status = status  # the answer's status if its head had arrived, else 0


class Broken(Exception):
    """The connection failed mid-request or mid-answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status  # the answer's status if its head had arrived, else 0


class Answer:
    __slots__ = ("body", "headers", "status", "whole")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, whole: bool) -> None:
        self.status, self.headers, self.body, self.whole = status, headers, body, whole

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k == key), None)


class _Stale(Exception):
    """A kept-alive connection had been closed by the peer: it answered nothing."""


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


class Pool:
    """Kept-alive connections to one or more `host:port`s, used from one event loop at a time.

    `resend_stale`: a request that finds its kept-alive connection already closed by the peer
    (it answered nothing) is sent again at once on a new connection; only for requests that are
    safe to repeat."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None, connect_timeout: float, read_timeout: float,
                 max_idle: int, resend_stale: bool) -> None:
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.resend_stale = resend_stale
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections_opened = 0

    async def request(self, host: str, port: int, method: str, target: str, headers: list[tuple[str, str]],
                      body: Sequence[bytes | bytearray], answer_limit: int) -> Answer:
        """Send the request with `body` (its pieces, in order) and read the answer, at most
        `answer_limit` bytes of it (`whole` False when it was longer: that connection is dropped)."""
        request = h11.Request(method=method, target=target, headers=headers)
        while True:
            conn = await self._connection(host, port)
            try:
                answer = await self._exchange(conn, request, body, answer_limit)
            except _Stale:  # only with resend_stale
                conn.close()
                continue  # closed by the peer while idle: send it afresh on a new connection
            except BaseException:
                conn.close()
                raise
            self._release(host, port, conn, answer.whole)
            return answer

    async def _connection(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._idle, self._loop = {}, loop
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self.ssl_context, server_hostname=host if self.ssl_context else None, limit=_READ)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(str(exc) or f"no connection within {self.connect_timeout:g} s") from None
        self.connections_opened += 1
        return _Connection(reader, writer)

    def _release(self, host: str, port: int, conn: _Connection, whole: bool) -> None:
        http = conn.http
        idle = self._idle.setdefault((host, port), [])
        if whole and http.our_state is h11.DONE and http.their_state is h11.DONE and len(idle) < self.max_idle:
            http.start_next_cycle()
            idle.append(conn)
        else:
            conn.close()

    async def _exchange(self, conn: _Connection, request: h11.Request, body: Sequence[bytes | bytearray],
                        answer_limit: int) -> Answer:
        http, writer = conn.http, conn.writer
        status, answer_headers, got = 0, [], bytearray()
        answered = False
        try:
            writer.writelines(http.send_with_data_passthrough(request) or ())
            for part in body:
                view = memoryview(part)
                for start in range(0, len(view), _PIECE):
                    piece = cast(bytes, view[start : start + _PIECE])  # h11 passes it through as it is
                    writer.writelines(http.send_with_data_passthrough(h11.Data(data=piece)) or ())
                    if writer.transport.get_write_buffer_size():  # the socket did not take it all at once
                        async with asyncio.timeout(self.read_timeout):
                            await writer.drain()
            writer.writelines(http.send_with_data_passthrough(h11.EndOfMessage()) or ())
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.read_timeout):
                        chunk = await conn.reader.read(_READ)
                    if not chunk and not answered and conn.reused and self.resend_stale:
                        raise _Stale()
                    answered = answered or bool(chunk)
                    http.receive_data(chunk)
                elif isinstance(event, h11.Response):
                    status, answer_headers = event.status_code, list(event.headers)
                elif isinstance(event, h11.Data):
                    got += event.data
                    if len(got) > answer_limit:
                        return Answer(status, answer_headers, bytes(got[:answer_limit]), False)
                elif isinstance(event, h11.EndOfMessage):
                    return Answer(status, answer_headers, bytes(got), True)
                elif isinstance(event, h11.ConnectionClosed):
                    raise Broken(status, "the peer closed the connection")
        except TimeoutError:
            raise NoProgress(status) from None
        except (OSError, h11.ProtocolError) as exc:
            if (self.resend_stale and not answered and conn.reused
                    and isinstance(exc, ConnectionResetError | BrokenPipeError)):
                raise _Stale() from exc
            raise Broken(status, str(exc) or type(exc).__name__) from None

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
