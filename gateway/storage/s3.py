"""S3 storage through the `minio` client: MinIO in production, any S3 server in tests.

The client gets its own urllib3 pool: enough connections for the upload concurrency, short
connect timeouts and few retries, so that an unreachable store turns into a prompt 503 instead
of a request that hangs through minio's default retry schedule.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import anyio
import urllib3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.error import S3Error
from urllib3.exceptions import HTTPError as Urllib3Error

from gateway.config import MinioSettings
from gateway.errors import ServiceUnavailable
from gateway.storage.base import CHUNK, ObjectInfo
from gateway.storage.s3put import AsyncPut, RegionUnknown, refusal

_CONNECT_S, _READ_S = 3.0, 60.0
_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}
_PART = 8 * 1024 * 1024


class S3Store:
    name = "minio"

    def __init__(self, settings: MinioSettings, pool_size: int = 32) -> None:
        self.bucket = settings.bucket
        http = urllib3.PoolManager(
            num_pools=4,
            maxsize=pool_size,
            timeout=urllib3.Timeout(connect=_CONNECT_S, read=_READ_S),
            # A read timeout is not retried: a store that accepts connections but does not answer
            # would otherwise hold an upload for 3 x 60 s before its 503.
            retries=urllib3.Retry(total=2, read=0, backoff_factor=0.1, status_forcelist=[502, 503, 504]),
        )
        self.client = self._client(settings, http)
        # The readiness probe (also run before uploads while the store is in doubt) answers
        # within seconds, so /api/ready and devices get their 503 promptly from a hung store.
        self._probe = self._client(settings, urllib3.PoolManager(
            num_pools=1, maxsize=4, timeout=urllib3.Timeout(connect=2.0, read=3.0), retries=False))
        self._bucket_ok = False
        self._async_put = AsyncPut(self.client, self.bucket, connect_timeout=_CONNECT_S, read_timeout=_READ_S,
                                   max_idle=pool_size)

    @staticmethod
    def _client(settings: MinioSettings, http: urllib3.PoolManager) -> Minio:
        return _Minio(
            settings.endpoint,
            access_key=settings.access_key or None,
            secret_key=settings.secret_key or None,
            secure=settings.secure,
            region=settings.region or None,
            http_client=http,
            sign_payload=settings.sign_payload,
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
                self.client._get_region(self.bucket)  # cached: the event loop's PUTs sign without asking
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
        """`put_bytes` from the event loop without a worker thread (`s3put`): the same signed
        request and the same errors."""
        try:
            await self._async_put.put(key, data, content_type)
        except RegionUnknown:  # ensure_ready has not run yet: minio asks for the region first
            await anyio.to_thread.run_sync(self.put_bytes, key, data, content_type)

    def close(self) -> None:
        """Drop the event loop's idle connections (the gateway is stopping)."""
        self._async_put.close()

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

    def free_bytes(self) -> int | None:
        return None


class _Minio(Minio):
    """The minio client, optionally without the body's SHA-256 in the signature over plain HTTP.

    Over HTTPS minio sends `UNSIGNED-PAYLOAD` and leaves the body's integrity to TLS. Over plain
    HTTP it hashes every body with SHA-256 first: 0.58 ms of gateway CPU per MiB on these
    machines, about an eighth of what a 1 MiB upload costs the gateway. With `sign_payload` off,
    the request is still signed (key, headers, date), the body is sent as `UNSIGNED-PAYLOAD`, as
    over HTTPS, and the image's own XXH3-128 (checked by `gateway verify`) stands for its bytes.
    """

    def __init__(self, endpoint: str, *, secure: bool, sign_payload: bool, **kwargs: Any) -> None:
        super().__init__(endpoint, secure=secure, **kwargs)
        self._hash_bodies = sign_payload or secure

    def _build_headers(
        self, host: str, headers: dict[str, Any] | None = None, body: bytes | None = None,
        creds: Credentials | None = None,
    ) -> tuple[dict[str, Any], datetime]:
        if self._hash_bodies or not body or creds is None:
            return super()._build_headers(host, headers, body, creds)
        headers, date = super()._build_headers(host, headers, None, creds)
        headers["Content-Length"] = str(len(body))
        headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
        return headers, date


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


def _store_error(exc: BaseException) -> Exception:
    if isinstance(exc, S3Error):
        return refusal(exc.code or "", f"{exc.code}: {exc.message}")
    return ServiceUnavailable("Object store unreachable", str(exc)[:200])
