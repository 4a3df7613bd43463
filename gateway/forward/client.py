"""The cloud's device API as the gateway uses it: forward one upload, ask about a key, relay a check-in,
a heartbeat or a provisioning request.

Uploads are the hot path. An image held whole in memory (the forward cache's copy) is sent from
the event loop on `gateway.httpio`'s kept-alive connections (`upload`): no worker thread, whose
hand-overs bound the drain rate. One that must be streamed (from the object store, or paced under
a bandwidth cap) is sent by a blocking call in a worker thread over a pooled urllib3 connection
(`upload_blocking`). Both give the same outcomes. (httpx's async stack cost about 5 ms of
event-loop CPU per 1 MiB image, so it is not used for uploads.) The rare calls (key checks,
check-ins, heartbeats, provisioning, probes) stay on the async httpx client.

Every answer is sorted into one of three kinds (SPEC §4): `delivered` (2xx, or 409: the cloud
already holds the bytes), `retry` (408, 429, 5xx, transport errors, timeouts; with the parsed
`Retry-After`) or `reject` (any other 4xx: kept with its status and the start of its body).
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpx
import msgspec
import urllib3
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError

from gateway.forward.backoff import parse_retry_after
from gateway.httpio import Broken, ConnectFailed, NoProgress, Pool

DELIVERED, RETRY, REJECT = "delivered", "retry", "reject"
USER_AGENT = "acusight-edge-gateway"
BODY_KEPT = 2048
ANSWER_READ = 64 * 1024  # an upload's answer is a small envelope; a longer one is cut and its connection dropped
RETRYABLE_4XX = frozenset({408, 429})


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

    def parts(self, image: bytes | bytearray) -> tuple[bytes, bytes | bytearray, bytes]:
        """The body's three pieces around an image held whole; raises `LocalBytesChanged` when
        `image` is not the size recorded."""
        if len(image) != self.size:
            raise LocalBytesChanged(f"stored object has {len(image)} bytes, {self.size} recorded")
        return self.head, image, self.tail

    def whole(self, image: bytes) -> bytes:
        """The body in one piece, for an image held whole (one send instead of one per part)."""
        return b"".join(self.parts(image))

    def body(self, image: Iterable[bytes]) -> Iterator[bytes]:
        yield self.head
        sent = 0
        for chunk in image:
            sent += len(chunk)
            if sent > self.size:
                raise LocalBytesChanged(f"stored object is longer than the recorded {self.size} bytes")
            yield chunk
        if sent != self.size:
            raise LocalBytesChanged(f"stored object has {sent} bytes, {self.size} recorded")
        yield self.tail


class LocalBytesChanged(Exception):
    """The object store gave back other bytes than were recorded: do not send a truncated image."""


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason)[:300] or type(exc).__name__


class Stopped(Exception):
    """The forwarder stopped waiting for this upload (shutdown): abandon the request."""


def _envelope(content: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(content)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _ids(payload: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    data = payload.get("data")
    if not isinstance(data, dict):
        return None, None, None

    def text(k: str) -> str | None:
        value = data.get(k)
        return value if isinstance(value, str) else None

    return text("image_id"), text("batch_id"), text("storage_key")


def classify(status: int, content: bytes, retry_after: str | None = None) -> Outcome:
    """Sort one HTTP answer to an upload into delivered / retry / reject."""
    if 200 <= status < 300 or status == 409:
        image_id, batch_id, storage_key = _ids(_envelope(content))
        return Outcome(kind=DELIVERED, status=status, image_id=image_id, batch_id=batch_id, storage_key=storage_key)
    snippet = content[:BODY_KEPT].decode("utf-8", "replace")
    if status in RETRYABLE_4XX or status >= 500:
        wait = parse_retry_after(retry_after, time.time())
        return Outcome(kind=RETRY, status=status, error=f"HTTP {status}: {snippet}", retry_after_s=wait)
    return Outcome(kind=REJECT, status=status, error=f"HTTP {status}: {snippet}")


class CloudClient:
    """One pooled HTTP client for everything the gateway asks of the cloud."""

    def __init__(self, base_url: str, timeout_s: float, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections + 4, max_keepalive_connections=max_connections + 4),
            headers={"User-Agent": USER_AGENT},
        )
        # No retries: a resend is the forwarder's decision (with backoff), and a body is sent once.
        self.pool = urllib3.PoolManager(
            num_pools=2, maxsize=max_connections + 4, retries=False, ca_certs=certifi.where(),
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s), headers={"User-Agent": USER_AGENT},
        )
        # Images held whole in memory go from the event loop (no worker thread): same timeouts,
        # no retries, and a kept-alive connection found closed is an attempt that failed.
        url = urlsplit(self.base_url)
        https = url.scheme == "https"
        self._host, self._port = url.hostname or "", url.port or (443 if https else 80)
        self._netloc, self._upload_path = url.netloc, url.path + "/device/images/upload"
        self.fast = Pool(ssl_context=ssl.create_default_context(cafile=certifi.where()) if https else None,
                         connect_timeout=timeout_s, read_timeout=timeout_s, max_idle=max_connections + 4,
                         resend_stale=False)

    async def aclose(self) -> None:
        await self.http.aclose()
        self.pool.clear()
        self.fast.close()

    async def upload(self, key: str, form: MultipartUpload, image: bytes | bytearray) -> Outcome:
        """`upload_blocking` from the event loop, for an image held whole in memory: the same
        request, and the same outcomes. Raises `LocalBytesChanged` when `image` is not the size
        recorded."""
        body = form.parts(image)
        headers = [("Host", self._netloc), ("User-Agent", USER_AGENT), ("X-Device-Key", key),
                   ("Content-Type", form.content_type), ("Content-Length", str(form.length))]
        try:
            answer = await self.fast.request(self._host, self._port, "POST", self._upload_path, headers,
                                             body, ANSWER_READ)
        except ConnectFailed as exc:
            return Outcome(kind=RETRY, error=f"cannot connect: {exc}"[:300], connection_failed=True)
        except NoProgress as exc:
            if exc.status:
                return Outcome(kind=RETRY, status=exc.status, error=f"HTTP {exc.status}: timed out reading the answer")
            return Outcome(kind=RETRY, error="timed out: ReadTimeout")
        except Broken as exc:
            if exc.status:
                return Outcome(kind=RETRY, status=exc.status, error=f"HTTP {exc.status}: answer cut off: {exc}"[:300])
            return Outcome(kind=RETRY, error=f"transport error: {exc}"[:300])
        return classify(answer.status, answer.body, answer.header("retry-after"))

    def upload_blocking(
        self, key: str, form: MultipartUpload, image: Iterable[bytes] | bytes, stop: threading.Event
    ) -> Outcome:
        """POST one image as the device (blocking: run it in a worker thread); never raises for
        cloud-side failures (they are outcomes). `image` is the bytes whole, or pieces to stream.
        Raises `Stopped` once `stop` is set, and whatever `image` raises (the store's errors,
        `LocalBytesChanged`)."""
        headers = {"X-Device-Key": key, "Content-Type": form.content_type, "Content-Length": str(form.length)}

        def body() -> Iterator[bytes]:
            assert not isinstance(image, bytes)
            for chunk in form.body(image):
                if stop.is_set():
                    raise Stopped
                yield chunk

        if isinstance(image, bytes):
            if stop.is_set():
                raise Stopped
            payload: bytes | Iterator[bytes] = form.whole(image)
        else:
            payload = body()
        try:
            resp = self.pool.request("POST", f"{self.base_url}/device/images/upload", body=payload, headers=headers,
                                     redirect=False, preload_content=False)
        except (NewConnectionError, ConnectTimeoutError) as exc:
            return Outcome(kind=RETRY, error=f"cannot connect: {_reason(exc)}", connection_failed=True)
        except ReadTimeoutError:
            return Outcome(kind=RETRY, error="timed out: ReadTimeout")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Outcome(kind=RETRY, error=f"transport error: {_reason(exc)}")
        whole = False
        try:
            content = resp.read(ANSWER_READ + 1)
            whole = len(content) <= ANSWER_READ
        except ReadTimeoutError:
            return Outcome(kind=RETRY, status=resp.status, error=f"HTTP {resp.status}: timed out reading the answer")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Outcome(kind=RETRY, status=resp.status, error=f"HTTP {resp.status}: answer cut off: {_reason(exc)}")
        finally:
            if not whole:  # not read to its end: the connection cannot carry another request
                resp.close()
            resp.release_conn()
        return classify(resp.status, content, resp.headers.get("retry-after"))

    async def device_self(self, key: str, timeout_s: float | None = None) -> KeyAnswer:
        """What the cloud says of `key`; status None when it could not be reached."""
        try:
            resp = await self.http.get(
                f"{self.base_url}/device/self", headers={"X-Device-Key": key},
                timeout=timeout_s if timeout_s is not None else self.timeout_s,
            )
        except httpx.HTTPError:
            return KeyAnswer(status=None)
        payload = _envelope(resp.content)
        err = payload.get("error")
        err = err if isinstance(err, dict) else {}
        data = payload.get("data")
        data = data if isinstance(data, dict) else None
        return KeyAnswer(status=resp.status_code, data=data, code=str(err.get("code") or ""),
                         message=str(err.get("message") or ""))

    async def probe(self, key: str | None) -> bool:
        """Whether the cloud answers at all (any HTTP status counts)."""
        try:
            if key:
                await self.http.get(f"{self.base_url}/device/self", headers={"X-Device-Key": key})
            else:
                await self.http.head(self.base_url)
        except httpx.HTTPError:
            return False
        return True

    async def checkin(self, key: str, body: bytes, timeout_s: float) -> list[Any]:
        """Relay a device's check-in; returns the cloud's `actions`. Raises `CloudUnreachable`."""
        try:
            resp = await self.http.post(
                f"{self.base_url}/device/checkin", content=body, timeout=timeout_s,
                headers={"X-Device-Key": key, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise CloudUnreachable(str(exc) or type(exc).__name__) from exc
        if resp.status_code >= 300:
            raise CloudUnreachable(f"HTTP {resp.status_code}")
        data = _envelope(resp.content).get("data")
        actions = data.get("actions") if isinstance(data, dict) else None
        return actions if isinstance(actions, list) else []

    async def relay_heartbeat(self, key: str, body: bytes, timeout_s: float) -> list[Any]:
        """Relay an agent's heartbeat (`POST /core/agent/checkin`, answered without the envelope);
        returns the cloud's `pending_actions`. Raises `CloudUnreachable`."""
        try:
            resp = await self.http.post(
                f"{self.base_url}/core/agent/checkin", content=body, timeout=timeout_s,
                headers={"X-Device-Key": key, "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise CloudUnreachable(str(exc) or type(exc).__name__) from exc
        if resp.status_code >= 300:
            raise CloudUnreachable(f"HTTP {resp.status_code}")
        actions = _envelope(resp.content).get("pending_actions")
        return actions if isinstance(actions, list) else []

    async def relay_provision(self, body: bytes, timeout_s: float) -> RelayedAnswer:
        """Pass a device's provisioning request to `POST /devices/provision` as received; the
        cloud's answer, whatever its status. Raises `CloudUnreachable` when none came."""
        try:
            resp = await self.http.post(
                f"{self.base_url}/devices/provision", content=body, timeout=timeout_s,
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise CloudUnreachable(str(exc) or type(exc).__name__) from exc
        return RelayedAnswer(status=resp.status_code, body=resp.content, retry_after=resp.headers.get("retry-after"))
