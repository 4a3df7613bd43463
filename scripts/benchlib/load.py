"""Closed-loop load generators: N threads, each with its own connection, fresh bytes per request.

Every request carries unique bytes (16 random bytes after the magic, then a shared random tail),
so the gateway's dedup never short-circuits, and nothing big is generated while timing.
"""

from __future__ import annotations

import http.client
import io
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, cast

from minio import Minio

JPEG = b"\xff\xd8\xff"


@dataclass
class Round:
    kind: str
    size: int
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    cpu: dict[str, float] = field(default_factory=dict)  # CPU ms per request, by process (see cpu.py)
    group: float = 0.0  # catalog writes per transaction in a gateway round (bench.grouped)
    first_error: str = ""  # what the first failed request raised, if any did

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.requests * self.size / self.seconds / 1e6 if self.seconds else 0.0

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 if lat else 0.0


def _run(kind: str, size: int, concurrency: int, total: int, one: Callable[[int, object], None],
         connect: Callable[[], object], rate: float | None = None) -> Round:
    """`total` requests from `concurrency` threads, each as soon as a thread is free, or with `rate`,
    the n-th request not before (n - 1) / rate seconds from the start (a steady load below saturation)."""
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors = [0]
    first_error: list[str] = []

    def worker() -> None:
        conn = connect()
        while True:
            with lock:
                if issued[0] >= total:
                    return
                issued[0] += 1
                n = issued[0]
            if rate:
                time.sleep(max(0.0, t0 + (n - 1) / rate - time.perf_counter()))
            started = time.perf_counter()
            try:
                one(n, conn)
            except Exception as exc:
                with lock:
                    errors[0] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}"[:300])
                conn = connect()
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Round(kind, size, concurrency, len(latencies), time.perf_counter() - t0, latencies, errors[0],
                 first_error="".join(first_error))


# A JPEG comment segment of 16 bytes: with a real JPEG as the tail, each upload's 16 random bytes go
# here, so every body is new to the exact dedup and still decodes (scripts/benchlib/neardup.py).
COMMENT16 = b"\xfe\x00\x12"


def _stamp_and_tail(size: int, jpeg: bytes | None) -> tuple[bytes, bytes]:
    """What follows JPEG in each body before its 16 random bytes, and the bytes shared by all bodies."""
    if jpeg is None:
        return b"", secrets.token_bytes(max(0, size - len(JPEG) - 16))
    return COMMENT16, jpeg[2:]


def multipart_upload(port: int, path: str, key: str | None, size: int, concurrency: int, total: int,
                     expect: tuple[int, ...] = (200, 201), jpeg: bytes | Sequence[bytes] | None = None,
                     rate: float | None = None) -> Round:
    """POST multipart uploads (the device contract) to 127.0.0.1:port; with `jpeg`, each body is
    that real JPEG (or the next of several, in turn) with a fresh comment, else JPEG magic and
    random bytes; with `rate`, at that many requests per second at most."""
    frames = [_stamp_and_tail(size, j) for j in ([jpeg] if jpeg is None or isinstance(jpeg, bytes) else jpeg)]
    stamp, tail = frames[0]
    size = len(JPEG) + len(stamp) + 16 + len(tail)
    boundary = "benchb0undary" + secrets.token_hex(4)
    epilogue = f"\r\n--{boundary}--\r\n".encode()

    def one(n: int, conn: object) -> None:
        assert isinstance(conn, http.client.HTTPConnection)
        stamp, tail = frames[n % len(frames)]
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f{n}.jpg\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + JPEG + stamp + secrets.token_bytes(16)
        conn.putrequest("POST", path, skip_accept_encoding=True)
        if key:
            conn.putheader("X-Device-Key", key)
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + len(tail) + len(epilogue)))
        conn.endheaders()
        conn.send(head)
        conn.send(tail)
        conn.send(epilogue)
        resp = conn.getresponse()
        resp.read()
        if resp.status not in expect:
            raise RuntimeError(f"status {resp.status}")

    return _run("http", size, concurrency, total, one, lambda: http.client.HTTPConnection("127.0.0.1", port), rate)


class _Body(io.RawIOBase):
    """A file-like view of prefix + shared tail, so minio reads it without a copy of the tail."""

    def __init__(self, prefix: bytes, tail: bytes) -> None:
        self._view = memoryview(prefix + tail) if len(tail) < 1 << 20 else None
        self._prefix, self._tail, self._pos = prefix, tail, 0
        self._size = len(prefix) + len(tail)

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._size - self._pos
        start, end = self._pos, min(self._size, self._pos + n)
        self._pos = end
        if self._view is not None:
            return bytes(self._view[start:end])
        p = len(self._prefix)
        out = self._prefix[start:end] if start < p else b""
        if end > p:
            out += self._tail[max(0, start - p) : end - p]
        return out


def s3_put(endpoint: str, access_key: str, secret_key: str, bucket: str, size: int, concurrency: int,
           total: int, jpeg: bytes | None = None) -> Round:
    """PUT objects of fresh bytes straight to S3 with the minio client (the ceiling)."""
    import urllib3

    stamp, tail = _stamp_and_tail(size, jpeg)
    size = len(JPEG) + len(stamp) + 16 + len(tail)
    http = urllib3.PoolManager(maxsize=concurrency + 4)
    client = Minio(endpoint, access_key, secret_key, secure=False, http_client=http)
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)

    def one(n: int, _: object) -> None:
        prefix = JPEG + stamp + secrets.token_bytes(16)
        key = f"raw-data/{secrets.token_hex(16)}_f{n}.jpg"
        client.put_object(bucket, key, cast(BinaryIO, _Body(prefix, tail)), size, content_type="image/jpeg",
                          part_size=8 * 1024 * 1024, num_parallel_uploads=1)

    return _run("s3", size, concurrency, total, one, lambda: None)


def s3_put_presigned(endpoint: str, access_key: str, secret_key: str, bucket: str, size: int, concurrency: int,
                     total: int, rate: float | None = None) -> Round:
    """PUT objects of fresh bytes straight to S3 as UNSIGNED-PAYLOAD: a URL presigned by the minio
    client (region given, so no look-up), sent over one kept-alive connection per thread; with
    `rate`, paced to that many requests per second (see `_run`)."""
    from datetime import timedelta

    tail = secrets.token_bytes(max(0, size - len(JPEG) - 16))
    client = Minio(endpoint, access_key, secret_key, secure=False, region="us-east-1")
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    host, _, port = endpoint.partition(":")

    def one(n: int, conn: object) -> None:
        assert isinstance(conn, http.client.HTTPConnection)
        url = client.presigned_put_object(bucket, f"raw-data/{secrets.token_hex(16)}_f{n}.jpg", timedelta(hours=1))
        target = url[url.index("/", len("http://")):]
        conn.putrequest("PUT", target, skip_accept_encoding=True)
        conn.putheader("Content-Type", "image/jpeg")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        conn.send(JPEG + secrets.token_bytes(16))
        conn.send(tail)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}")

    return _run("s3-presigned", size, concurrency, total, one,
                lambda: http.client.HTTPConnection(host, int(port or 80)), rate)
