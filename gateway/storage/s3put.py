"""PUT of an in-memory image to the S3 store from the event loop, without a worker thread.

The `minio` client blocks, so each upload used to hop to a worker thread for its PUT and back.
Under load a hop waits for a core and for the GIL: with 100 KiB images at 8 uploads in flight,
getting into the thread took 3.3 ms of a 17.6 ms upload. Here the request is still the `minio`
client's own (its URL, headers and SigV4 signature, `_Minio` in `s3.py`); only its bytes travel
on the event loop (`gateway.httpio`). Spooled images, too big for memory, still go through
`minio` in a thread.

Retries follow the blocking client's urllib3 settings: a connection that fails or a 502/503/504
answer is tried twice more, 0.1 s and 0.2 s later (a PUT of the same bytes under the same key is
idempotent); a store that stops making progress within the read timeout is not retried. A request
on a kept-alive connection that the server had closed meanwhile is resent at once on a new one.
"""

from __future__ import annotations

import asyncio
import ssl
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, cast

from minio.signer import sign_v4_s3

from gateway.errors import InsufficientStorage, ServiceUnavailable
from gateway.httpio import Broken, ConnectFailed, NoProgress, Pool

if TYPE_CHECKING:
    from minio import Minio

FULL_CODES = frozenset({"XMinioStorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded", "StorageFull"})
_RETRY_STATUS = frozenset({502, 503, 504})
_RETRIES = 2
_BACKOFF_S = 0.1
_MAX_ERROR_BODY = 64 * 1024


class RegionUnknown(Exception):
    """The bucket's region is not known yet (`ensure_ready` learns it): use the blocking client."""


class _Refused(Exception):
    """The store answered with a status other than 2xx."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code or f'HTTP {status}'}: {message}" if message else code or f"HTTP {status}")
        self.status, self.code = status, code


class AsyncPut:
    """PUTs bytes under keys of one bucket, as requests signed by `client`, on the running loop."""

    def __init__(self, client: Minio, bucket: str, *, connect_timeout: float, read_timeout: float,
                 max_idle: int) -> None:
        self.client = client
        self.bucket = bucket
        self.pool = Pool(ssl_context=ssl.create_default_context() if client._base_url.is_https else None,
                         connect_timeout=connect_timeout, read_timeout=read_timeout, max_idle=max_idle,
                         resend_stale=True)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`; raises `ServiceUnavailable` or `InsufficientStorage` as the
        blocking client's callers expect, and `RegionUnknown` before the bucket's region is known."""
        for attempt in range(_RETRIES + 1):
            try:
                await self._put_once(key, data, content_type)
                return
            except _Refused as exc:
                if exc.status not in _RETRY_STATUS or attempt == _RETRIES:
                    raise refusal(exc.code, str(exc)[:200]) from None
            except NoProgress:
                raise ServiceUnavailable("Object store unreachable",
                                         f"no progress within {self.pool.read_timeout:g} s") from None
            except (ConnectFailed, Broken) as exc:
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
        fields = [(k, v) for k, vs in headers.items() for v in ([vs] if isinstance(vs, str) else vs)]
        answer = await self.pool.request(
            url.hostname or "", url.port or (443 if self.pool.ssl_context else 80), "PUT",
            url.path + ("?" + url.query if url.query else ""), fields, (data,), _MAX_ERROR_BODY)
        if answer.status // 100 != 2:
            code, message = _s3_error(answer.body) if "xml" in (answer.header("content-type") or "") else ("", "")
            raise _Refused(answer.status, code, message)

    def close(self) -> None:
        self.pool.close()


def _s3_error(body: bytes) -> tuple[str, str]:
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
