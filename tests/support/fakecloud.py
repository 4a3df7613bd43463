"""A fake AcuSight cloud for tests: a real HTTP/1.1 server on 127.0.0.1 that speaks the device API.

It implements what the gateway forwards to (SPEC §2, §4): `POST /api/device/images/upload`
(streamed multipart, XXH3-128 dedup across the whole cloud, 201 / 409 `DUPLICATE_IMAGE`),
`GET /api/device/self`, `POST /api/device/checkin`, the agents' heartbeat `POST /api/core/agent/checkin`
(answered without the envelope) and `POST /api/devices/provision` (tokens from ``add_provisioning_token``),
with the same key rules and envelope.
Bodies are parsed incrementally from the socket and only hashes and metadata are kept, so 40 MiB
uploads cost a few 64 KiB buffers.

Failures can be switched on from any thread at any time:

- ``refuse_connections()`` / ``accept_connections()``: close the listening socket (connects get
  ECONNREFUSED, open keep-alive connections are shut down) and listen again on the same port;
- ``fail_next(n, status, retry_after)`` and ``set_mode("status", ...)``: answer with an error;
- ``set_key_status(key, status)``: one device's key answers with ``status``;
- ``stall(seconds)``: process the request (an upload is stored) and then hold the answer, for
  ``seconds`` or until ``release()``: the "response lost, resend gets 409" case;
- ``reset_mid_body()``: read part of the body, then close the socket with an RST.

One-shot faults (``n`` requests) are used before the persistent mode. Faults apply to every
``/api`` path unless ``path=`` names one (e.g. :data:`UPLOAD_PATH`).

Another process (a soak script) can run it with ``python -m tests.support.fakecloud --port P
--keys-file F`` and steer it through ``/_control/`` on the same port: ``POST /_control/mode``
(``{"mode": "normal"|"status"|"refuse"|"stall"|"reset", "status", "retry_after", "seconds",
"n", "path"}``; ``refuse`` lasts ``seconds``, default 5, since the control API goes away with
it), ``POST /_control/release``, ``POST /_control/devices`` (``{"key", "device_id", "status",
"name"}``) and ``GET /_control/stats``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import multipart
import xxhash

from tests.support.ports import free_port

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
UPLOAD_PATH = "/api/device/images/upload"
SELF_PATH = "/api/device/self"
CHECKIN_PATH = "/api/device/checkin"
HEARTBEAT_PATH = "/api/core/agent/checkin"
PROVISION_PATH = "/api/devices/provision"
CHUNK = 64 * 1024
MAX_SMALL_BODY = 1024 * 1024  # JSON bodies and the metadata part
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Mode = Literal["normal", "status", "refuse", "stall", "reset"]

_CODES = {
    400: "VALIDATION_ERROR",
    401: "INVALID_DEVICE_KEY",
    403: "DEVICE_NOT_APPROVED",
    404: "NOT_FOUND",
    409: "DUPLICATE_IMAGE",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    507: "INSUFFICIENT_STORAGE",
}


def error_code_for(status: int) -> str:
    """The UPPER_SNAKE error code the fake cloud sends with ``status``."""
    return _CODES.get(status, "SERVICE_UNAVAILABLE" if status >= 500 else "ERROR")


def fake_jpeg(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that sniff as JPEG, distinct per ``seed`` (so they do not dedup)."""
    rest = random.Random(seed).randbytes(max(0, size - len(JPEG_MAGIC)))
    return (JPEG_MAGIC + rest)[:size]


@dataclass(frozen=True)
class Device:
    """A device key the cloud knows; status is pending, approved, rejected or revoked."""

    key: str
    device_id: str
    status: str
    name: str
    organization_id: str


@dataclass(frozen=True)
class Received:
    """One upload request that reached the handler, whatever was answered (status 0: reset).

    ``xxh3_hex`` is empty when the image was not read to its end. The cloud ids are set for
    201 (the new ids) and 409 (the existing image's ids).
    """

    device_key: str | None
    device_id: str | None
    filename: str | None
    content_type: str | None
    size: int
    xxh3_hex: str
    metadata_raw: bytes | None
    status: int
    at: float
    image_id: str | None = None
    batch_id: str | None = None
    storage_key: str | None = None


@dataclass(frozen=True)
class Checkin:
    """One accepted ``POST /device/checkin``: the device and the JSON body as received."""

    device_id: str
    body: bytes
    at: float


@dataclass(frozen=True)
class Provisioned:
    """One device the cloud provisioned: its id (``c-`` + the device's own id), key and request."""

    device_id: str
    key: str
    token: str
    body: bytes


@dataclass
class _Fault:
    kind: Literal["status", "stall", "reset"]
    remaining: int | None  # None: until set_mode("normal")
    path: str | None
    status: int = 503
    retry_after: str | None = None
    seconds: float | None = None  # stall: None holds until release()
    read_bytes: int | None = None  # reset: body bytes read before the RST
    # The release() generation current when the fault was set: release() sets it.
    released: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Reply:
    status: int
    body: dict[str, Any]
    retry_after: str | None = None
    close: bool = False


def _ok(status: int, data: dict[str, Any]) -> _Reply:
    return _Reply(status, {"success": True, "data": data})


def _err(
    status: int,
    message: str,
    *,
    code: str | None = None,
    details: str = "",
    data: dict[str, Any] | None = None,
    retry_after: str | None = None,
    close: bool = False,
) -> _Reply:
    body: dict[str, Any] = {
        "success": False,
        "error": {"code": code or error_code_for(status), "message": message, "details": details},
    }
    if data is not None:
        body["data"] = data
    return _Reply(status, body, retry_after, close)


class _Body:
    """A request body (Content-Length or chunked), read in bounded pieces."""

    def __init__(self, rfile: io.BufferedIOBase, headers: Message) -> None:
        self._rfile = rfile
        self._chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
        self._remaining = 0 if self._chunked else int(headers.get("Content-Length") or 0)
        self._chunk_left = 0
        self._done = False
        self.length = -1 if self._chunked else self._remaining
        self.consumed = 0

    def read(self, n: int = CHUNK) -> bytes:
        """Up to ``n`` bytes; b"" at the end. A peer that hangs up early raises ConnectionError."""
        if self._chunked:
            data = self._read_chunked(n)
        else:
            if self._remaining <= 0:
                return b""
            data = self._rfile.read(min(n, self._remaining))
            self._remaining -= len(data)
        if not data and not self._done and (self._chunked or self._remaining > 0):
            raise ConnectionError("client closed the connection mid-body")
        self.consumed += len(data)
        return data

    def _read_chunked(self, n: int) -> bytes:
        if self._done:
            return b""
        if self._chunk_left == 0:
            line = self._rfile.readline(1024)
            if not line:
                return b""
            self._chunk_left = int(line.split(b";")[0].strip(), 16)
            if self._chunk_left == 0:
                while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self._done = True
                return b""
        data = self._rfile.read(min(n, self._chunk_left))
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._rfile.readline(8)  # CRLF after the chunk
        return data

    def read_small(self) -> bytes:
        """The whole body, for JSON endpoints; ValueError past MAX_SMALL_BODY."""
        out = bytearray()
        while chunk := self.read():
            out += chunk
            if len(out) > MAX_SMALL_BODY:
                raise ValueError("body too large")
        return bytes(out)

    def drain(self) -> None:
        while self.read():
            pass


@dataclass
class _Upload:
    filename: str | None = None
    content_type: str | None = None
    size: int = 0
    xxh3_hex: str = ""
    head: bytes = b""
    metadata: bytes | None = None
    has_image: bool = False
    error: _Reply | None = None


def _parse_upload(
    body: _Body, content_type: str, max_image_bytes: int, stop_after: int | None = None
) -> _Upload:
    """Stream the multipart body, hashing ``image``; stop early after ``stop_after`` bytes."""
    up = _Upload()
    ctype, opts = multipart.parse_options_header(content_type)
    boundary = opts.get("boundary")
    if ctype != "multipart/form-data" or not boundary:
        if stop_after is None:
            body.drain()
        up.error = _err(400, "expected multipart/form-data")
        return up
    hasher = xxhash.xxh3_128()
    target: str | None = None
    meta = bytearray()
    parser = multipart.PushMultipartParser(boundary, content_length=body.length)
    try:
        while not parser.closed:
            if stop_after is not None and body.consumed >= stop_after:
                return up
            limit = CHUNK if stop_after is None else min(CHUNK, stop_after - body.consumed)
            chunk = body.read(limit)
            for event in parser.parse(chunk):
                if isinstance(event, multipart.MultipartSegment):
                    target = "skip"
                    if event.name == "image" and not up.has_image:
                        target, up.has_image = "image", True
                        up.filename, up.content_type = event.filename, event.content_type
                    elif event.name == "metadata" and up.metadata is None:
                        target = "metadata"
                elif event is None:
                    if target == "metadata":
                        up.metadata = bytes(meta)
                    target = None
                elif target == "image":
                    up.size += len(event)
                    if up.size > max_image_bytes:
                        up.error = _err(413, "image too large", close=True)
                        return up
                    if len(up.head) < 8:
                        up.head += event[: 8 - len(up.head)]
                    hasher.update(event)
                elif target == "metadata":
                    meta += event
                    if len(meta) > MAX_SMALL_BODY:
                        up.error = _err(400, "metadata too large", close=True)
                        return up
    except multipart.MultipartError as exc:
        up.error = _err(400, "malformed multipart body", details=str(exc), close=True)
        return up
    body.drain()  # epilogue, if any
    up.xxh3_hex = hasher.hexdigest()
    return up


def _safe_filename(name: str | None, head: bytes) -> str:
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1].replace("..", "")
    name = "".join(ch for ch in name if ch.isprintable())[:200]
    return name or ("image.png" if head.startswith(PNG_MAGIC) else "image.jpg")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # else server_close() joins held and idle keep-alive handlers
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, cloud: FakeCloud, port: int) -> None:
        self.cloud = cloud
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # resets, refusals and timeouts are the point here
            log.debug("fake cloud connection ended: %r", exc)
        else:
            log.exception("fake cloud handler failed")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle + delayed ACK add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.cloud._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.cloud._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fake cloud: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        cloud = self.server.cloud
        path = self.path.split("?", 1)[0]
        cloud._count(path)
        try:
            body = _Body(self.rfile, self.headers)
        except ValueError:
            self._send(_err(400, "bad Content-Length or chunk size", close=True))
            return
        if path.startswith("/_control/"):
            reply, after = cloud._control(self.command, path, body)
            self._send(reply)
            if after is not None:
                threading.Thread(target=after, daemon=True, name="fakecloud-control").start()
            return
        fault = cloud._take_fault(path)
        if fault is not None and fault.kind == "reset":
            self._reset(cloud, path, body, fault)
            return
        if path == UPLOAD_PATH and self.command == "POST":
            reply = cloud._upload(self.headers, body, fault)
        elif path == SELF_PATH and self.command == "GET":
            reply = cloud._self(self.headers, body, fault)
        elif path == CHECKIN_PATH and self.command == "POST":
            reply = cloud._checkin(self.headers, body, fault)
        elif path == HEARTBEAT_PATH and self.command == "POST":
            reply = cloud._heartbeat(self.headers, body, fault)
        elif path == PROVISION_PATH and self.command == "POST":
            reply = cloud._provision(body, fault)
        else:
            body.drain()
            reply = _err(404, f"no route for {self.command} {path}")
        if fault is not None and fault.kind == "stall":
            cloud._hold(fault)
        self._send(reply)

    def _reset(self, cloud: FakeCloud, path: str, body: _Body, fault: _Fault) -> None:
        size = body.length if body.length >= 0 else 2 * CHUNK
        stop_after = fault.read_bytes if fault.read_bytes is not None else min(size // 2, CHUNK)
        if path == UPLOAD_PATH:
            up = _parse_upload(
                body, self.headers.get("Content-Type") or "", cloud.max_image_bytes, stop_after
            )
            cloud._record_attempt(self.headers.get("X-Device-Key"), up, 0)
        else:
            while body.consumed < stop_after and body.read(min(CHUNK, stop_after - body.consumed)):
                pass
        self.close_connection = True
        cloud._track(self.connection, add=False)
        # SO_LINGER 0 turns close() into an RST; rfile holds a reference that keeps the fd open.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.connection.close()

    def _send(self, reply: _Reply) -> None:
        payload = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if reply.retry_after is not None:
            self.send_header("Retry-After", reply.retry_after)
        if reply.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)


class FakeCloud:
    """The fake cloud: state, failure switches and the server that serves them.

    Every method may be called from any thread while requests are in flight.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        organization_id: str = "org_fake",
        max_image_bytes: int = 50 * 1024 * 1024,
        batch_max_images: int = 1000,
    ) -> None:
        self.organization_id = organization_id
        self.max_image_bytes = max_image_bytes
        self.batch_max_images = batch_max_images
        self._port = port
        self._cond = threading.Condition(threading.RLock())
        self._lifecycle = threading.Lock()
        self._stop_event = threading.Event()
        self._server: _Server | None = None
        self._started = False
        self._conns: set[socket.socket] = set()
        self._devices: dict[str, Device] = {}
        self._key_status: dict[str, tuple[int, str | None]] = {}
        self._stored: dict[str, Received] = {}
        self._attempts: list[Received] = []
        self._checkins: list[Checkin] = []
        self._per_device: dict[str, list[str]] = {}
        self._batches: dict[str, tuple[str, int]] = {}
        self._requests: Counter[str] = Counter()
        self._oneshots: list[_Fault] = []
        self._mode: _Fault | None = None
        self._held = 0
        self._release = threading.Event()
        self._actions: list[dict[str, Any]] = []
        self._heartbeats: list[Checkin] = []
        self._pending_actions: list[dict[str, Any]] = []
        self._tokens: dict[str, str] = {}  # provisioning token -> status of the devices it makes
        self._provisioned: list[Provisioned] = []

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeCloud:
        """Listen on 127.0.0.1 (port 0 picks a free one below the ephemeral range, kept for the
        cloud's lifetime, so that it is still free when the cloud comes back)."""
        with self._lifecycle:
            if not self._started:
                self._started = True
                self._stop_event.clear()
                self._listen()
        return self

    def stop(self) -> None:
        """Stop listening, wake held requests and shut every open connection."""
        with self._lifecycle:
            self._started = False
            self._stop_event.set()
            self._clear_faults()
            self._unlisten()

    def __enter__(self) -> FakeCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``; the control API lives under ``/_control/``."""
        return f"http://{HOST}:{self._port}"

    @property
    def url(self) -> str:
        """The base URL the gateway gets as ``cloud.url``: ``http://127.0.0.1:PORT/api``."""
        return f"{self.origin}/api"

    def refuse_connections(self) -> None:
        """Close the listening socket and every open connection: connects get ECONNREFUSED."""
        with self._lifecycle:
            self._unlisten()

    def accept_connections(self) -> None:
        """Listen again on the same port (no-op while listening or after stop())."""
        with self._lifecycle:
            if self._started and self._server is None:
                self._listen()

    @property
    def accepting(self) -> bool:
        return self._server is not None

    def _listen(self) -> None:
        deadline = time.monotonic() + 5
        first = self._port == 0  # a port of our own choosing, below the ephemeral range (ports.py)
        while True:
            try:
                server = _Server(self, free_port() if first else self._port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0 if first else 0.05)  # taken since it was picked: pick another
        self._port = server.server_address[1]
        self._server = server
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"fakecloud-{self._port}",
        ).start()

    def _unlisten(self) -> None:
        self._close_listener()
        self._shut_connections()

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _shut_connections(self) -> None:
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # --- devices -----------------------------------------------------------------------------

    def add_device(
        self,
        key: str,
        device_id: str | None = None,
        status: str = "approved",
        name: str | None = None,
    ) -> Device:
        """Register (or replace) a device key; the device id defaults to a new UUID."""
        device_id = device_id or str(uuid.uuid4())
        device = Device(
            key, device_id, status, name or f"device-{device_id[:8]}", self.organization_id
        )
        with self._cond:
            self._devices[key] = device
        return device

    def set_key_status(
        self, key: str, http_status: int | None, retry_after: str | None = None
    ) -> None:
        """Answer every request carrying ``key`` with ``http_status`` (None: back to normal)."""
        with self._cond:
            if http_status is None:
                self._key_status.pop(key, None)
            else:
                self._key_status[key] = (http_status, retry_after)

    # --- failure modes -------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        retry_after: str | None = None,
        *,
        path: str | None = None,
    ) -> None:
        """Answer the next ``n`` requests with ``status`` (the body is read and recorded first)."""
        self._add_fault(_Fault("status", n, path, status=status, retry_after=retry_after))

    def stall(
        self, seconds: float | None = None, n: int | None = 1, *, path: str | None = None
    ) -> None:
        """Process the next ``n`` requests (None: all), then hold each answer for ``seconds``
        (None: until release())."""
        self._add_fault(_Fault("stall", n, path, seconds=seconds))

    def release(self) -> None:
        """Answer every held request now and drop the stall faults not used yet."""
        with self._cond:
            self._release.set()
            self._release = threading.Event()
            self._oneshots = [f for f in self._oneshots if f.kind != "stall"]
            if self._mode is not None and self._mode.kind == "stall":
                self._mode = None

    def reset_mid_body(
        self, n: int | None = 1, *, read_bytes: int | None = None, path: str | None = None
    ) -> None:
        """For the next ``n`` requests, read ``read_bytes`` of the body (default: half, up to
        64 KiB), then close the socket with an RST."""
        self._add_fault(_Fault("reset", n, path, read_bytes=read_bytes))

    def set_mode(
        self,
        mode: Mode,
        *,
        status: int = 503,
        retry_after: str | None = None,
        seconds: float | None = None,
        path: str | None = None,
    ) -> None:
        """Switch the persistent mode. ``normal`` clears every fault, releases held requests and
        listens again; ``refuse`` refuses connections (for ``seconds``, or until normal)."""
        if mode == "normal":
            self._clear_faults()
            self.accept_connections()
        elif mode == "refuse":
            self.refuse_connections()
            if seconds is not None:
                threading.Thread(target=self._accept_after, args=(seconds,), daemon=True).start()
        elif mode in ("status", "stall", "reset"):
            fault = _Fault(
                mode, None, path, status=status, retry_after=retry_after, seconds=seconds
            )
            with self._cond:
                fault.released = self._release
                self._mode = fault
        else:
            raise ValueError(f"unknown mode {mode!r}")

    def _refuse_rest(self, seconds: float) -> None:
        self._shut_connections()
        self._accept_after(seconds)

    def _accept_after(self, seconds: float) -> None:
        if not self._stop_event.wait(seconds):
            self.accept_connections()

    def _add_fault(self, fault: _Fault) -> None:
        with self._cond:
            fault.released = self._release
            self._oneshots.append(fault)

    def _clear_faults(self) -> None:
        with self._cond:
            self.release()
            self._oneshots.clear()
            self._mode = None

    def _take_fault(self, path: str) -> _Fault | None:
        with self._cond:
            for fault in [*self._oneshots, self._mode]:
                if fault is None or (fault.path is not None and fault.path != path):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._oneshots.remove(fault)
                return fault
        return None

    def _hold(self, fault: _Fault) -> None:
        with self._cond:
            self._held += 1
            self._cond.notify_all()
        try:
            fault.released.wait(fault.seconds)
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    # --- what was received ------------------------------------------------------------------

    @property
    def stored(self) -> dict[str, Received]:
        """Accepted (201) uploads by XXH3-128 hex digest, in arrival order."""
        with self._cond:
            return dict(self._stored)

    @property
    def attempts(self) -> list[Received]:
        """Every upload request that reached the handler, in order, with the status answered."""
        with self._cond:
            return list(self._attempts)

    @property
    def checkins(self) -> list[Checkin]:
        with self._cond:
            return list(self._checkins)

    @property
    def heartbeats(self) -> list[Checkin]:
        """Accepted ``POST /core/agent/checkin`` requests, in order."""
        with self._cond:
            return list(self._heartbeats)

    @property
    def pending_actions(self) -> list[dict[str, Any]]:
        """The ``pending_actions`` every heartbeat answer carries (settable)."""
        with self._cond:
            return list(self._pending_actions)

    @pending_actions.setter
    def pending_actions(self, actions: list[dict[str, Any]]) -> None:
        with self._cond:
            self._pending_actions = list(actions)

    def add_provisioning_token(self, token: str, status: str = "approved") -> None:
        """Accept ``token`` at ``/devices/provision``; the devices it makes get ``status``."""
        with self._cond:
            self._tokens[token] = status

    @property
    def provisioned(self) -> list[Provisioned]:
        with self._cond:
            return list(self._provisioned)

    @property
    def held(self) -> int:
        """How many requests are being held by a stall right now."""
        with self._cond:
            return self._held

    @property
    def checkin_actions(self) -> list[dict[str, Any]]:
        """The ``actions`` every checkin answer carries (settable)."""
        with self._cond:
            return list(self._actions)

    @checkin_actions.setter
    def checkin_actions(self, actions: list[dict[str, Any]]) -> None:
        with self._cond:
            self._actions = list(actions)

    def count_requests(self, path: str) -> int:
        """Requests that reached the server for ``path`` ("/device/x" means "/api/device/x")."""
        if not path.startswith(("/api/", "/_control/")):
            path = "/api" + path
        with self._cond:
            return self._requests[path]

    def wait_until(self, predicate: Callable[[FakeCloud], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (re-checked on every recorded change)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def stats(self) -> dict[str, Any]:
        """Counts for a soak script; also served as ``GET /_control/stats``."""
        with self._cond:
            by_status = Counter(str(a.status) for a in self._attempts)
            return {
                "attempts": len(self._attempts),
                "stored": len(self._stored),
                "duplicates": by_status.get("409", 0),
                "by_status": dict(by_status),
                "requests": dict(self._requests),
                "checkins": len(self._checkins),
                "held": self._held,
                "accepting": self._server is not None,
                "devices": {dev: list(hashes) for dev, hashes in self._per_device.items()},
            }

    def _count(self, path: str) -> None:
        with self._cond:
            self._requests[path] += 1

    # --- endpoints ----------------------------------------------------------------------------

    def _auth(self, key: str | None) -> tuple[Device | None, _Reply | None]:
        with self._cond:
            if not key:
                return None, _err(401, "missing X-Device-Key", code="UNAUTHORIZED")
            device = self._devices.get(key)
            forced = self._key_status.get(key)
        if forced is not None:
            return device, _err(forced[0], "forced answer for this key", retry_after=forced[1])
        if device is None or device.status == "revoked":
            return device, _err(401, "unknown or revoked device key")
        if device.status != "approved":
            return device, _err(403, f"device is {device.status}")
        return device, None

    @staticmethod
    def _fault_reply(fault: _Fault | None) -> _Reply | None:
        if fault is None or fault.kind != "status":
            return None
        return _err(fault.status, "injected failure", retry_after=fault.retry_after)

    def _upload(self, headers: Message, body: _Body, fault: _Fault | None) -> _Reply:
        up = _parse_upload(body, headers.get("Content-Type") or "", self.max_image_bytes)
        key = headers.get("X-Device-Key")
        device, auth_error = self._auth(key)
        reply = (up.error if up.error is not None and up.error.close else None) or (
            self._fault_reply(fault) or auth_error or up.error or self._validate(up)
        )
        if reply is not None:
            self._record_attempt(key, up, reply.status)
            return reply
        assert device is not None
        with self._cond:
            existing = self._stored.get(up.xxh3_hex)
            if existing is not None:
                self._record_attempt(key, up, 409, existing)
                ids = {
                    "image_id": existing.image_id,
                    "batch_id": existing.batch_id,
                    "storage_key": existing.storage_key,
                }
                return _err(409, "image already stored", data=ids)
            image_uuid = uuid.uuid4()
            batch_id, count = self._batches.get(device.device_id, ("", self.batch_max_images))
            if count >= self.batch_max_images:
                batch_id, count = f"batch_{uuid.uuid4()}", 0
            self._batches[device.device_id] = (batch_id, count + 1)
            ids = {
                "image_id": f"img_{image_uuid}",
                "batch_id": batch_id,
                "storage_key": f"raw-data/{image_uuid.hex}_{_safe_filename(up.filename, up.head)}",
            }
            rec = self._record_attempt(key, up, 201, ids=ids)
            self._stored[up.xxh3_hex] = rec
            self._per_device.setdefault(device.device_id, []).append(up.xxh3_hex)
            return _ok(201, ids)

    @staticmethod
    def _validate(up: _Upload) -> _Reply | None:
        if not up.has_image:
            return _err(400, "missing image part")
        if up.size == 0:
            return _err(400, "empty image")
        if not (up.head.startswith(JPEG_MAGIC) or up.head.startswith(PNG_MAGIC)):
            return _err(415, "image is neither JPEG nor PNG")
        if up.metadata is not None:
            try:
                parsed = json.loads(up.metadata)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                return _err(400, "metadata is not a JSON object")
        return None

    def _record_attempt(
        self,
        key: str | None,
        up: _Upload,
        status: int,
        existing: Received | None = None,
        ids: dict[str, Any] | None = None,
    ) -> Received:
        with self._cond:
            device = self._devices.get(key) if key else None
            ids = ids or {}
            rec = Received(
                device_key=key,
                device_id=device.device_id if device else None,
                filename=up.filename,
                content_type=up.content_type,
                size=up.size,
                xxh3_hex=up.xxh3_hex,
                metadata_raw=up.metadata,
                status=status,
                at=time.monotonic(),
                image_id=existing.image_id if existing else ids.get("image_id"),
                batch_id=existing.batch_id if existing else ids.get("batch_id"),
                storage_key=existing.storage_key if existing else ids.get("storage_key"),
            )
            self._attempts.append(rec)
            self._cond.notify_all()
            return rec

    def _self(self, headers: Message, body: _Body, fault: _Fault | None) -> _Reply:
        body.drain()
        device, auth_error = self._auth(headers.get("X-Device-Key"))
        reply = self._fault_reply(fault) or auth_error
        if reply is not None:
            return reply
        assert device is not None
        return _ok(
            200,
            {
                "device_id": device.device_id,
                "endpoint_id": device.device_id,
                "organization_id": device.organization_id,
                "status": device.status,
                "name": device.name,
            },
        )

    def _checkin(self, headers: Message, body: _Body, fault: _Fault | None) -> _Reply:
        try:
            raw = body.read_small()
        except ValueError:
            return _err(400, "checkin body too large", close=True)
        device, auth_error = self._auth(headers.get("X-Device-Key"))
        reply = self._fault_reply(fault) or auth_error
        if reply is not None:
            return reply
        assert device is not None
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            return _err(400, "checkin body is not a JSON object")
        with self._cond:
            self._checkins.append(Checkin(device.device_id, raw, time.monotonic()))
            self._cond.notify_all()
            return _ok(200, {"actions": list(self._actions)})

    def _heartbeat(self, headers: Message, body: _Body, fault: _Fault | None) -> _Reply:
        try:
            raw = body.read_small()
        except ValueError:
            return _err(400, "heartbeat body too large", close=True)
        device, auth_error = self._auth(headers.get("X-Device-Key"))
        reply = self._fault_reply(fault) or auth_error
        if reply is not None:
            return reply
        assert device is not None
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("device_id"), str):
            return _err(400, "heartbeat body is not a JSON object with a device_id")
        with self._cond:
            self._heartbeats.append(Checkin(device.device_id, raw, time.monotonic()))
            self._cond.notify_all()
            return _Reply(200, {"pending_actions": list(self._pending_actions), "success": True})

    def _provision(self, body: _Body, fault: _Fault | None) -> _Reply:
        try:
            raw = body.read_small()
        except ValueError:
            return _err(413, "provisioning body too large", close=True)
        reply = self._fault_reply(fault)
        if reply is not None:
            return reply
        try:
            parsed = json.loads(raw)
            token, info = parsed["token"], parsed["device_info"]
            own_id = info["device_id"]
        except (ValueError, TypeError, KeyError):
            return _err(400, "expected {token, device_info: {device_id}}")
        with self._cond:
            status = self._tokens.get(token) if isinstance(token, str) else None
            if status is None:
                return _err(401, "unknown provisioning token", code="INVALID_TOKEN")
            device_id = f"c-{own_id}"
            if any(d.device_id == device_id for d in self._devices.values()):
                return _err(409, "device already provisioned", code="DEVICE_EXISTS", details=device_id)
            key = "adk_" + uuid.uuid4().hex
            self._devices[key] = Device(key, device_id, status, str(info.get("name") or device_id),
                                        self.organization_id)
            self._provisioned.append(Provisioned(device_id, key, token, raw))
            self._cond.notify_all()
        return _ok(201, {"device_id": device_id, "endpoint_id": device_id, "api_key": key,
                         "api_endpoint": self.url, "status": status, "organization_id": self.organization_id,
                         "edge_key": "edge-" + device_id, "portainer_endpoint_id": 7})

    def _control(
        self, method: str, path: str, body: _Body
    ) -> tuple[_Reply, Callable[[], None] | None]:
        try:
            raw = body.read_small()
            spec = json.loads(raw) if raw.strip() else {}
            if not isinstance(spec, dict):
                raise ValueError("expected a JSON object")
            if method == "GET" and path == "/_control/stats":
                return _ok(200, self.stats()), None
            if method == "POST" and path == "/_control/release":
                self.release()
                return _ok(200, {}), None
            if method == "POST" and path == "/_control/devices":
                dev = self.add_device(
                    spec["key"],
                    spec.get("device_id"),
                    spec.get("status", "approved"),
                    spec.get("name"),
                )
                return _ok(200, {"device_id": dev.device_id}), None
            if method == "POST" and path == "/_control/mode":
                return self._control_mode(spec)
        except (ValueError, KeyError, TypeError) as exc:
            return _err(400, "bad control request", details=str(exc), close=True), None
        return _err(404, f"no control route for {method} {path}"), None

    def _control_mode(self, spec: dict[str, Any]) -> tuple[_Reply, Callable[[], None] | None]:
        mode = spec.get("mode")
        status = int(spec.get("status", 503))
        retry_after = None if spec.get("retry_after") is None else str(spec["retry_after"])
        seconds = None if spec.get("seconds") is None else float(spec["seconds"])
        n = None if spec.get("n") is None else int(spec["n"])
        path = spec.get("path")
        answer = _ok(200, {"mode": mode})
        if mode == "refuse":
            # New connects are refused once this answer is sent; open connections (this one
            # too) are shut right after it. The control API goes away with the listener, so
            # the refusal always ends by itself.
            with self._lifecycle:
                self._close_listener()
            duration = 5.0 if seconds is None else seconds
            return answer, lambda: self._refuse_rest(duration)
        if n is not None and mode == "status":
            self.fail_next(n, status, retry_after, path=path)
        elif n is not None and mode == "stall":
            self.stall(seconds, n, path=path)
        elif n is not None and mode == "reset":
            self.reset_mid_body(n, path=path)
        elif mode in ("normal", "status", "stall", "reset"):
            self.set_mode(mode, status=status, retry_after=retry_after, seconds=seconds, path=path)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return answer, None


def load_keys_file(cloud: FakeCloud, path: Path) -> int:
    """Register the keys in ``path``; returns how many.

    JSON: a list of key strings or ``{"key", "device_id", "status", "name"}`` objects. Otherwise
    text: one ``KEY [DEVICE_ID [STATUS [NAME]]]`` per line, ``#`` starts a comment.
    """
    text = path.read_text()
    entries: list[dict[str, Any]] = []
    try:
        data = json.loads(text)
    except ValueError:
        for line in text.splitlines():
            parts = line.split("#", 1)[0].split(None, 3)
            if parts:
                entries.append(
                    dict(zip(("key", "device_id", "status", "name"), parts, strict=False))
                )
    else:
        entries = [{"key": item} if isinstance(item, str) else dict(item) for item in data]
    for entry in entries:
        cloud.add_device(
            entry["key"], entry.get("device_id"), entry.get("status", "approved"), entry.get("name")
        )
    return len(entries)


def main(argv: list[str] | None = None) -> int:
    """Run the fake cloud until SIGTERM/SIGINT; prints ``FAKECLOUD_URL=<base url>`` when ready."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fakecloud", description="Fake AcuSight cloud on 127.0.0.1."
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to listen on (0: pick a free one)"
    )
    parser.add_argument("--keys-file", type=Path, help="device keys to accept (JSON or text lines)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    cloud = FakeCloud(args.port)
    if args.keys_file is not None:
        load_keys_file(cloud, args.keys_file)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    cloud.start()
    print(f"FAKECLOUD_URL={cloud.url}", flush=True)
    while not done.wait(0.2):
        pass
    cloud.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
