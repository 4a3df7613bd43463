"""S3 storage through the `minio` client: MinIO in production, any S3 server in tests.

An image's bytes travel on the event loop, over the gateway's shared aiohttp session
(`gateway.outbound`): the PUT of an image held in memory and the GET of one (forwarding, the sync
API) are URLs presigned by minio's public API (region from the settings: no look-up), so the
body goes as UNSIGNED-PAYLOAD and no worker thread is involved. Everything else (bucket checks,
spooled files, stat, list, delete, manifests) is minio's own blocking calls in worker threads,
over a urllib3 pool with short connect timeouts and few retries, so that an unreachable store
turns into a prompt 503 instead of a request that hangs through minio's default retry schedule.

The event loop's PUT is retried as that pool is (`gateway.retries.OBJECT_STORE`: a failed
connection or a 502/503/504 answer is tried twice more; a PUT of the same bytes under the same key
is idempotent); a store that stops making progress, or is not done within the deadline, is not.
"""

from __future__ import annotations

import asyncio
import ssl
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, cast

import aiohttp
import anyio
import urllib3
import yarl
from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError as Urllib3Error

from gateway.config import MinioSettings
from gateway.errors import InsufficientStorage, ServiceUnavailable
from gateway.outbound import Outbound
from gateway.retries import OBJECT_STORE
from gateway.storage.base import CHUNK, ObjectInfo

_CONNECT_S, _READ_S, _DEADLINE_S = 3.0, 60.0, 300.0
_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}
_PART = 8 * 1024 * 1024
FULL_CODES = frozenset({"XMinioStorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded", "StorageFull"})
_MAX_ERROR_BODY = 64 * 1024
_PRESIGNED_FOR = timedelta(minutes=15)


class _Refused(Exception):
    """The store answered with a status other than 2xx."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code or f'HTTP {status}'}: {message}" if message else code or f"HTTP {status}")
        self.status, self.code = status, code


class S3Store:
    name = "minio"

    def __init__(self, settings: MinioSettings, pool_size: int = 32, http: Outbound | None = None, *,
                 connect_s: float = _CONNECT_S, read_s: float = _READ_S, deadline_s: float = _DEADLINE_S) -> None:
        self.bucket = settings.bucket
        pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=pool_size,
            timeout=urllib3.Timeout(connect=connect_s, read=read_s),
            # A read timeout is not retried: a store that accepts connections but does not answer
            # would otherwise hold an upload for 3 x 60 s before its 503.
            retries=urllib3.Retry(total=OBJECT_STORE.attempts - 1, read=0, backoff_factor=OBJECT_STORE.first_delay_s,
                                  status_forcelist=sorted(OBJECT_STORE.retry_statuses)),
        )
        self.client = self._client(settings, pool)
        # The readiness probe (also run before uploads while the store is in doubt) answers
        # within seconds, so /api/ready and devices get their 503 promptly from a hung store.
        self._probe = self._client(settings, urllib3.PoolManager(
            num_pools=1, maxsize=4, timeout=urllib3.Timeout(connect=2.0, read=3.0), retries=False))
        self._bucket_ok = False
        self.http = http or Outbound(pool_size)
        self.sign_payload = settings.sign_payload and not settings.secure
        self.ssl: ssl.SSLContext | bool = ssl.create_default_context() if settings.secure else True
        self.put_timeout = aiohttp.ClientTimeout(total=deadline_s, sock_connect=connect_s, sock_read=read_s)
        # A GET streams to whoever reads it (a sync job may be slow): progress timeouts only.
        self.get_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)

    @staticmethod
    def _client(settings: MinioSettings, http: urllib3.PoolManager) -> Minio:
        return Minio(
            settings.endpoint,
            access_key=settings.access_key or None,
            secret_key=settings.secret_key or None,
            secure=settings.secure,
            region=settings.region or "us-east-1",
            http_client=http,
        )

    def ensure_ready(self) -> None:
        try:
            if not self._bucket_ok:
                if not self._probe.bucket_exists(self.bucket):
                    try:
                        self.client.make_bucket(self.bucket)
                    except S3Error as exc:
                        if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
                self._bucket_ok = True
            else:
                self._probe.bucket_exists(self.bucket)
        except (S3Error, Urllib3Error, OSError) as exc:
            self._bucket_ok = False
            raise _store_error(exc) from exc

    def put_file(self, key: str, path: Path, size: int, content_type: str) -> None:
        try:
            with open(path, "rb") as fh:
                self.client.put_object(
                    self.bucket, key, fh, size, content_type=content_type, part_size=_PART,
                    num_parallel_uploads=1,
                )
        except (S3Error, Urllib3Error, OSError) as exc:
            raise _store_error(exc) from exc

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        try:
            body = cast(BinaryIO, _WholeReader(data))
            self.client.put_object(self.bucket, key, body, len(data), content_type=content_type,
                                   part_size=_PART, num_parallel_uploads=1)  # one PUT up to 8 MiB
        except (S3Error, Urllib3Error, OSError) as exc:
            raise _store_error(exc) from exc

    async def put_bytes_async(self, key: str, data: bytes, content_type: str) -> None:
        """`put_bytes` from the event loop: a presigned PUT with the bytes as UNSIGNED-PAYLOAD
        (with `sign_payload` over plain HTTP: minio's own signed PUT, in a worker thread)."""
        if self.sign_payload:
            await anyio.to_thread.run_sync(self.put_bytes, key, data, content_type)
            return
        url = yarl.URL(self.client.presigned_put_object(self.bucket, key, _PRESIGNED_FOR), encoded=True)
        session = await self.http.session()
        for attempt in range(1, OBJECT_STORE.attempts + 1):
            try:
                async with session.put(url, data=data, headers={"Content-Type": content_type},
                                       timeout=self.put_timeout, ssl=self.ssl) as resp:
                    status = resp.status
                    body = await _read_some(resp)  # a 2xx counts once its answer has arrived whole
                if status // 100 == 2:
                    return
                code, message = _s3_error(body)
                if not OBJECT_STORE.retries(status) or OBJECT_STORE.gives_up_after(attempt):
                    raise refusal(code, str(_Refused(status, code, message))[:200])
            except TimeoutError:
                raise ServiceUnavailable("Object store unreachable", "no progress within the timeouts") from None
            except aiohttp.ClientResponseError as exc:  # an answer the parser refused
                if OBJECT_STORE.gives_up_after(attempt):
                    raise ServiceUnavailable("Object store unreachable", f"bad answer: {exc.message}"[:200]) from None
            except aiohttp.ClientError as exc:
                if OBJECT_STORE.gives_up_after(attempt):
                    raise ServiceUnavailable("Object store unreachable",
                                             (str(exc) or type(exc).__name__)[:200]) from None
            await asyncio.sleep(OBJECT_STORE.delay_s(attempt))

    async def read_async(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes by a presigned GET on the event loop; `KeyError` when missing."""
        url = yarl.URL(self.client.presigned_get_object(self.bucket, key, _PRESIGNED_FOR), encoded=True)
        session = await self.http.session()
        try:
            resp = await session.get(url, timeout=self.get_timeout, ssl=self.ssl)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceUnavailable("Object store unreachable", (str(exc) or type(exc).__name__)[:200]) from None
        if resp.status // 100 != 2:
            try:
                code, message = _s3_error(await _read_some(resp))
            except (aiohttp.ClientError, TimeoutError):
                code, message = "", ""
            finally:
                resp.close()
            if resp.status == 404 or code in _NOT_FOUND:
                raise KeyError(key)
            raise refusal(code, str(_Refused(resp.status, code, message))[:200])
        return _chunks(resp)

    def close(self) -> None:
        """Nothing to let go of: the shared session belongs to the runtime."""

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            resp = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                raise KeyError(key) from None
            raise _store_error(exc) from exc
        except (Urllib3Error, OSError) as exc:
            raise _store_error(exc) from exc
        return _stream(resp, chunk_size)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _NOT_FOUND or exc.code == "ResourceNotFound":
                return None
            raise _store_error(exc) from exc
        except (Urllib3Error, OSError) as exc:
            raise _store_error(exc) from exc
        modified = st.last_modified.timestamp() if st.last_modified else 0.0
        return ObjectInfo(key, int(st.size or 0), modified)

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, key)
        except S3Error as exc:
            if exc.code not in _NOT_FOUND:
                raise _store_error(exc) from exc
        except (Urllib3Error, OSError) as exc:
            raise _store_error(exc) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if obj.object_name is None or obj.is_dir:
                    continue
                modified = obj.last_modified.timestamp() if obj.last_modified else 0.0
                yield ObjectInfo(obj.object_name, int(obj.size or 0), modified)
        except (S3Error, Urllib3Error, OSError) as exc:
            raise _store_error(exc) from exc


class _WholeReader:
    """A file-like view of `data` whose first whole read hands back `data` itself: minio then
    signs and sends the caller's bytes without copying them (io.BytesIO copies twice)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if self._pos == 0 and (size < 0 or size >= len(self._data)):
            self._pos = len(self._data)
            return self._data
        end = len(self._data) if size < 0 else self._pos + size
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


def _stream(resp: urllib3.BaseHTTPResponse, chunk_size: int) -> Iterator[bytes]:
    try:
        yield from resp.stream(chunk_size)
    except (Urllib3Error, OSError) as exc:
        raise _store_error(exc) from exc
    finally:
        resp.close()
        resp.release_conn()


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ServiceUnavailable("Object store unreachable", (str(exc) or type(exc).__name__)[:200]) from None
    finally:
        resp.close() if not resp.content.at_eof() else resp.release()


async def _read_some(resp: aiohttp.ClientResponse) -> bytes:
    """The answer's body, at most `_MAX_ERROR_BODY` of it (an S3 answer is short XML or nothing)."""
    got = bytearray()
    while len(got) < _MAX_ERROR_BODY and (chunk := await resp.content.read(_MAX_ERROR_BODY - len(got))):
        got += chunk
    return bytes(got)


def _s3_error(body: bytes) -> tuple[str, str]:
    if not body.lstrip().startswith(b"<"):
        return "", ""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


def refusal(code: str, details: str) -> Exception:
    """The error for a store that answered no (here or through minio): 507 material when full."""
    if code in FULL_CODES:
        return InsufficientStorage("Object store is full", code)
    return ServiceUnavailable("Object store refused the request", details)


def _store_error(exc: BaseException) -> Exception:
    if isinstance(exc, S3Error):
        return refusal(exc.code or "", f"{exc.code}: {exc.message}")
    return ServiceUnavailable("Object store unreachable", str(exc)[:200])
