"""The cloud's device API as the gateway uses it: forward one upload, ask about a key, relay a check-in,
a heartbeat or a provisioning request.

Every request goes through the runtime's shared aiohttp session (`gateway.outbound`) with the
same timeouts (connect and each read within `cloud.timeout_s`, the whole request within
`cloud.deadline_s`) and the same proxy (`[cloud] proxy`, else HTTP(S)_PROXY/NO_PROXY).
JSON calls share `request_json`; uploads stream their body and go through `classify`, the one
mapping from answers and transport failures to outcomes (SPEC §4): `delivered` (2xx, or 409: the
cloud already holds the bytes), `retry` (408, 429, 5xx, transport errors, timeouts; with the
parsed `Retry-After`) or `reject` (any other 4xx: kept with its status and the start of its body).
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import certifi
import msgspec
from aiohttp.abc import AbstractStreamWriter

from gateway.envelope import Envelope, read_envelope
from gateway.forward.backoff import parse_retry_after
from gateway.outbound import Outbound, cloud_proxy
from gateway.retries import CLOUD

DELIVERED, RETRY, REJECT = "delivered", "retry", "reject"
BODY_KEPT = 2048
ANSWER_READ = 64 * 1024  # an upload's answer is a small envelope; a longer one is cut and its connection dropped
PIECE = 64 * 1024  # bytes per bandwidth-bucket take: smooth pacing without a take per byte
Held = bytes | bytearray  # an image's bytes held whole in memory


class Outcome(msgspec.Struct, kw_only=True):
    """What one forward attempt came to."""

    kind: str  # delivered | retry | reject
    status: int | None = None  # None: no HTTP answer
    error: str = ""
    retry_after_s: float | None = None
    connection_failed: bool = False  # nothing reached the cloud (refused, DNS, connect timeout)
    image_id: str | None = None
    batch_id: str | None = None
    storage_key: str | None = None


class KeyAnswer(msgspec.Struct, kw_only=True):
    """The cloud's answer to `GET /device/self`: `status` None means it could not be reached."""

    status: int | None
    data: dict[str, Any] | None = None
    code: str = ""
    message: str = ""


class CloudUnreachable(Exception):
    """No usable answer from the cloud (transport error, timeout, 5xx, 429)."""


class RelayedAnswer(msgspec.Struct, kw_only=True):
    """A cloud answer to pass on to a device as it came (provisioning)."""

    status: int
    body: bytes
    retry_after: str | None = None


def _quote(value: str) -> str:
    # RFC 7578 §4.2: names go in a quoted string; quotes and line breaks must not break out.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartUpload:
    """The upload request body: a metadata part (as stored, when any) and the image part, with
    an exact length so the cloud sees a Content-Length, not a chunked body."""

    def __init__(self, filename: str, content_type: str, size: int, metadata: bytes | None) -> None:
        self.boundary = "gw" + secrets.token_hex(16)
        head = b""
        if metadata is not None:
            head += (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n"
                     f"Content-Type: application/json\r\n\r\n").encode() + metadata + b"\r\n"
        head += (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                 f"filename=\"{_quote(filename)}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
        self.head = head
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.size = size

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    @property
    def length(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    def parts(self, image: Held) -> tuple[bytes, Held, bytes]:
        """The body's three pieces around an image held whole; raises `LocalBytesChanged` when
        `image` is not the size recorded."""
        if len(image) != self.size:
            raise LocalBytesChanged(f"stored object has {len(image)} bytes, {self.size} recorded")
        return self.head, image, self.tail

    async def stream(self, image: Held | AsyncIterable[bytes],
                     pace: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        """The body, piece by piece: `image` whole or streamed (checked against the recorded
        size, `LocalBytesChanged` otherwise); `pace(n)` waits before each piece under a cap."""
        yield self.head
        if isinstance(image, Held):
            self.parts(image)  # the size check
            pieces: AsyncIterable[bytes] = _once(image)
        else:
            pieces = image
        sent = 0
        async for chunk in pieces:
            sent += len(chunk)
            if sent > self.size:
                raise LocalBytesChanged(f"stored object is longer than the recorded {self.size} bytes")
            if pace is None:
                yield chunk
                continue
            view = memoryview(chunk)
            for start in range(0, len(view), PIECE):
                piece = view[start : start + PIECE]
                await pace(len(piece))
                yield bytes(piece)
        if sent != self.size:
            raise LocalBytesChanged(f"stored object has {sent} bytes, {self.size} recorded")
        yield self.tail


async def _once(data: Held) -> AsyncIterator[bytes]:
    yield data  # type: ignore[misc]  # aiohttp writes a bytearray as it is


class WholeBody(aiohttp.Payload):
    """An upload body around an image held whole: three writes, no generator to step through
    (aiohttp's public payload interface; `size` gives the request its Content-Length)."""

    def __init__(self, form: MultipartUpload, image: Held) -> None:
        super().__init__(image, content_type=form.content_type)
        self.pieces = form.parts(image)
        self.length = form.length

    @property
    def size(self) -> int:
        return self.length

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("an image upload's body is binary")

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"".join(self.pieces)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for piece in self.pieces:
            await writer.write(piece)


class LocalBytesChanged(Exception):
    """The object store gave back other bytes than were recorded: do not send a truncated image."""


class CloudAnswer(msgspec.Struct, kw_only=True):
    """A JSON call's answer: the HTTP status and the parsed envelope."""

    status: int
    envelope: Envelope


def _reason(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:300]


async def read_answer(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the answer's body, and whether that was all of it."""
    got = bytearray()
    while len(got) <= limit:
        chunk = await resp.content.read(limit + 1 - len(got))
        if not chunk:
            return bytes(got), True
        got += chunk
    return bytes(got[:limit]), False


def classify(status: int | None, content: bytes = b"", retry_after: str | None = None,
             failure: BaseException | None = None) -> Outcome:
    """Sort what one upload came to into delivered / retry / reject: the answer's status and
    body, and `failure` when the exchange failed (`status` then says whether the answer's head
    had arrived). A status is judged by itself, even when the connection broke after it (an
    early 413 while the body was still going out), except that a 2xx counts only when its
    answer arrived whole."""
    if failure is not None and (status is None or 200 <= status < 300):
        if isinstance(failure, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return Outcome(kind=RETRY, error=f"cannot connect: {_reason(failure)}", connection_failed=True)
        timed_out = isinstance(failure, TimeoutError)
        if status is not None:
            what = "timed out reading the answer" if timed_out else f"answer cut off: {_reason(failure)}"
            return Outcome(kind=RETRY, status=status, error=f"HTTP {status}: {what}"[:300])
        if timed_out:
            return Outcome(kind=RETRY, error=f"timed out: {type(failure).__name__}")
        return Outcome(kind=RETRY, error=f"transport error: {_reason(failure)}")
    assert status is not None
    if 200 <= status < 300 or status == 409:
        answer = read_envelope(content)
        return Outcome(kind=DELIVERED, status=status, image_id=answer.data_text("image_id"),
                       batch_id=answer.data_text("batch_id"), storage_key=answer.data_text("storage_key"))
    snippet = content[:BODY_KEPT].decode("utf-8", "replace")
    if CLOUD.retries(status):
        wait = parse_retry_after(retry_after, time.time())
        return Outcome(kind=RETRY, status=status, error=f"HTTP {status}: {snippet}", retry_after_s=wait)
    return Outcome(kind=REJECT, status=status, error=f"HTTP {status}: {snippet}")


class CloudClient:
    """Everything the gateway asks of the cloud, over the runtime's shared session."""

    def __init__(self, http: Outbound, base_url: str, timeout_s: float, deadline_s: float = 300.0,
                 proxy: str = "") -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.proxy = cloud_proxy(self.base_url, proxy)
        self.ssl = ssl.create_default_context(cafile=certifi.where()) if self.base_url.startswith("https:") else None

    def timeout(self, timeout_s: float | None = None, extra_s: float = 0.0) -> aiohttp.ClientTimeout:
        """Progress timeouts (connect, each read) and the whole request's deadline; `timeout_s`
        given (a device waits on the answer): that bounds each step and the whole."""
        if timeout_s is not None:  # a caller that waits (a device): that long at most, in all
            return aiohttp.ClientTimeout(total=timeout_s + extra_s, sock_connect=timeout_s, sock_read=timeout_s)
        return aiohttp.ClientTimeout(total=self.deadline_s + extra_s, sock_connect=self.timeout_s,
                                     sock_read=self.timeout_s)

    async def request_json(self, method: str, path: str, key: str | None, body: Any = None,
                           timeout_s: float | None = None) -> CloudAnswer:
        """Send a JSON request (`body` encoded when not None) to the cloud, as the device with
        `key` or without one; the status and parsed envelope of any HTTP answer. Raises
        `CloudUnreachable` when no whole answer came (transport error, timeout)."""
        raw = await self.request_raw(method, path, key, body, timeout_s)
        return CloudAnswer(status=raw.status, envelope=read_envelope(raw.body))

    async def request_raw(self, method: str, path: str, key: str | None, body: Any = None,
                          timeout_s: float | None = None) -> RelayedAnswer:
        """`request_json`'s exchange, with the answer's bytes as they came (to pass on as they are)."""
        headers = {"Accept": "application/json"}
        if key is not None:
            headers["X-Device-Key"] = key
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        session = await self.http.session()
        try:
            async with session.request(method, self.base_url + path, data=data, headers=headers,
                                       timeout=self.timeout(timeout_s), proxy=self.proxy, ssl=self.ssl or True,
                                       allow_redirects=False) as resp:
                content, _ = await read_answer(resp, ANSWER_READ)
                return RelayedAnswer(status=resp.status, body=content, retry_after=resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CloudUnreachable(_reason(exc)) from exc

    async def upload(self, key: str, form: MultipartUpload, image: Held | AsyncIterable[bytes],
                     pace: Callable[[int], Awaitable[None]] | None = None, extra_s: float = 0.0) -> Outcome:
        """POST one image as the device; never raises for cloud-side failures (they are
        outcomes, `classify`). Raises what `image` raises (`LocalBytesChanged`, the store's
        errors): nothing then counts as delivered. `extra_s`: more time for a paced body."""
        headers = {"X-Device-Key": key, "Content-Type": form.content_type, "Content-Length": str(form.length)}
        body_error: list[BaseException] = []

        async def body() -> AsyncIterator[bytes]:
            try:
                async for piece in form.stream(image, pace):
                    yield piece
            except Exception as exc:
                body_error.append(exc)
                raise

        # An image held whole and not paced goes in three writes; otherwise piece by piece.
        data: aiohttp.Payload | AsyncIterator[bytes] = (
            WholeBody(form, image) if pace is None and isinstance(image, Held) else body())
        status: int | None = None
        session = await self.http.session()
        try:
            async with session.post(self.base_url + "/device/images/upload", data=data, headers=headers,
                                    timeout=self.timeout(extra_s=extra_s), proxy=self.proxy, ssl=self.ssl or True,
                                    allow_redirects=False) as resp:
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                try:
                    content, whole = await read_answer(resp, ANSWER_READ)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if body_error:
                        raise body_error[0] from None
                    return classify(status, b"", retry_after, failure=exc)
                if not whole:
                    resp.close()  # longer than any envelope: that connection carries nothing more
        except (aiohttp.ClientError, TimeoutError) as exc:
            if body_error:
                raise body_error[0] from None
            return classify(status, failure=exc)
        if body_error:
            raise body_error[0]
        return classify(status, content, retry_after)

    async def device_self(self, key: str, timeout_s: float | None = None) -> KeyAnswer:
        """What the cloud says of `key`; status None when it could not be reached."""
        try:
            answer = await self.request_json("GET", "/device/self", key, timeout_s=timeout_s)
        except CloudUnreachable:
            return KeyAnswer(status=None)
        data = answer.envelope.data
        err = answer.envelope.error
        return KeyAnswer(status=answer.status, data=data if isinstance(data, dict) else None, code=err.code,
                         message=err.message)

    async def probe(self, key: str | None) -> bool:
        """Whether the cloud answers at all (any HTTP status counts)."""
        try:
            if key:
                await self.request_json("GET", "/device/self", key)
            else:
                await self.request_json("HEAD", "", None)
        except CloudUnreachable:
            return False
        return True

    async def checkin(self, key: str, body: bytes, timeout_s: float) -> list[Any]:
        """Relay a device's check-in; returns the cloud's `actions`. Raises `CloudUnreachable`."""
        answer = await self.request_json("POST", "/device/checkin", key, body, timeout_s=timeout_s)
        if answer.status >= 300:
            raise CloudUnreachable(f"HTTP {answer.status}")
        actions = answer.envelope.data_dict().get("actions")
        return actions if isinstance(actions, list) else []

    async def relay_heartbeat(self, key: str, body: bytes, timeout_s: float) -> list[Any]:
        """Relay an agent's heartbeat (`POST /core/agent/checkin`, answered without the envelope);
        returns the cloud's `pending_actions`. Raises `CloudUnreachable`."""
        answer = await self.request_json("POST", "/core/agent/checkin", key, body, timeout_s=timeout_s)
        if answer.status >= 300:
            raise CloudUnreachable(f"HTTP {answer.status}")
        return answer.envelope.member_list("pending_actions")

    async def relay_provision(self, body: bytes, timeout_s: float) -> RelayedAnswer:
        """Pass a device's provisioning request to `POST /devices/provision` as received; the
        cloud's answer, whatever its status. Raises `CloudUnreachable` when none came."""
        return await self.request_raw("POST", "/devices/provision", None, body, timeout_s=timeout_s)
