"""A raw-socket HTTP/1.1 server on loopback that misbehaves on purpose, for the outbound client's tests.

Each behaviour is a coroutine that owns a whole connection (`reader`, `writer`, the server), so a
test can send what no well-behaved server would: an extra response, an answer before the body
has been read, an answer one byte at a time, a broken status line. `stored` counts the requests
the server took in full and answered 2xx in full: nothing else may count as stored or delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "HostileServer"], Awaitable[None]]

CLOUD_OK = (b'{"success": true, "data": {"image_id": "img_1", "batch_id": "b_1", "storage_key": "k"}}')


class HostileServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.requests = 0  # request heads read
        self.stored = 0  # requests read whole and answered 2xx whole
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HostileServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.behaviour(reader, writer, self)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def head(self, reader: asyncio.StreamReader) -> int:
        """Read one request's head; its Content-Length."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        return 0

    async def request(self, reader: asyncio.StreamReader) -> int:
        """Read one whole request (head and body); the body's length."""
        length = await self.head(reader)
        await reader.readexactly(length)
        return length


def response(status: int, body: bytes = b"", extra: str = "", reason: str = "X") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def ok_body(path: str) -> bytes:
    """What a success looks like on each path: the cloud's envelope, S3's empty 200."""
    return CLOUD_OK if path == "cloud" else b""


def behaviours(path: str) -> dict[str, Behaviour]:
    """The corpus. `path` is "cloud" (the forwarder's POST) or "s3" (the image PUT)."""
    good = 201 if path == "cloud" else 200
    refusal = response(413, b'{"success": false}') if path == "cloud" else response(
        403, b"<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>no</Message></Error>",
        "Content-Type: application/xml\r\n")

    async def extra_response(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        # Answers its first request, then, unasked, a 500: the next request must not take it.
        while True:
            await s.request(r)
            w.write(response(good, ok_body(path)))
            s.stored += 1
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(response(500, b"unsolicited"))
            await w.drain()

    async def early_answer_and_close(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        await s.head(r)
        await r.read(64 * 1024)  # a little of the body, then the answer, then gone
        w.write(refusal.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        await w.drain()
        w.close()

    async def drip(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        await s.request(r)
        for byte in response(good, ok_body(path)):  # each byte within the read timeout, never all
            w.write(bytes([byte]))
            await w.drain()
            await asyncio.sleep(0.3)

    async def chunked_answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        while True:
            await s.request(r)
            body = ok_body(path)
            pieces = b"".join(f"{len(body[i:i + 7]):x}\r\n".encode() + body[i:i + 7] + b"\r\n"
                              for i in range(0, len(body), 7))
            w.write(f"HTTP/1.1 {good} X\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + pieces + b"0\r\n\r\n")
            s.stored += 1
            await w.drain()

    async def oversized_headers(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        await s.request(r)
        w.write(f"HTTP/1.1 {good} X\r\nX-Big: {'a' * 200_000}\r\nContent-Length: 0\r\n\r\n".encode())
        await w.drain()
        await asyncio.sleep(5)

    async def garbage_status_line(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        await s.request(r)
        w.write(b"HTTP/1.1 2O1 Created?\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        await asyncio.sleep(5)

    async def close_mid_body(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        await s.request(r)
        w.write(f"HTTP/1.1 {good} X\r\nContent-Length: 100\r\n\r\n{{\"succ".encode())
        await w.drain()
        w.close()

    async def continue_100(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: HostileServer) -> None:
        while True:
            length = await s.head(r)
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # unasked for: the real answer follows
            await w.drain()
            await r.readexactly(length)
            w.write(response(good, ok_body(path)))
            s.stored += 1
            await w.drain()

    return {
        "extra response": extra_response,
        "early answer and close": early_answer_and_close,
        "drip": drip,
        "chunked answer": chunked_answer,
        "oversized headers": oversized_headers,
        "garbage status line": garbage_status_line,
        "close mid-body": close_mid_body,
        "100-continue": continue_100,
    }
