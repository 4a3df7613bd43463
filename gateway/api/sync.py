"""The sync API (`/api/sync`): cloud sync jobs list batches, fetch manifests and image bytes, ack.

Every route wants `Authorization: Bearer <[sync] token>` (403 while the API is off, 401 for a
missing or wrong token). Drainable batches are the `forwarded` ones; acking one makes it
`drained`, acking it again answers the same, acking one not yet forwarded is 409 CONFLICT.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
import xxhash
from litestar import Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Dependency, Parameter
from litestar.response import Stream

from gateway.api.auth import require_bearer
from gateway.api.envelope import ok
from gateway.batches import queries as q
from gateway.batches.manifests import CONTENT_TYPE as PARQUET
from gateway.batches.manifests import ManifestWriter
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.errors import NotFound
from gateway.ops.metrics import Metrics
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.sync")
HASH_HEADER = "X-Content-XXH3-128"


def sync_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    settings: Settings = connection.app.state.services.settings
    require_bearer(connection, settings.sync.token, "sync")  # type: ignore[arg-type]


@get("/batches")
async def list_batches(
    catalog: Catalog,
    batch_state: str | None = Parameter(query="state", default=None),  # `state` is reserved by Litestar
    limit: int = 100,
    offset: int = 0,
) -> Response[bytes]:
    q.check_page(batch_state, limit, offset)
    rows, total = await catalog.read(lambda c: q.list_batches(c, batch_state, limit, offset))
    return ok(rows, meta={"total": total, "limit": limit, "offset": offset})


@get("/batches/{batch_id:str}")
async def show_batch(catalog: Catalog, batch_id: str) -> Response[bytes]:
    return ok(await catalog.read(lambda c: q.read_batch_with_manifest(c, batch_id)))


@get("/batches/{batch_id:str}/manifest.parquet")
async def batch_manifest(manifests: ManifestWriter, batch_id: str) -> Response[bytes]:
    def load() -> bytes:
        return manifests.read_bytes(manifests.current_manifest(batch_id))

    data = await anyio.to_thread.run_sync(load)
    headers = {HASH_HEADER: xxhash.xxh3_128_hexdigest(data)}
    return Response(data, media_type=PARQUET, headers=headers)


@get("/images/{image_id:str}")
async def image_bytes(catalog: Catalog, store: Annotated[ObjectStore, Dependency(skip_validation=True)],
                      metrics: Metrics, image_id: str) -> Stream:
    image = await catalog.read(lambda c: q.read_image(c, image_id))
    try:
        # Found before the headers go out, so a missing object is still a clean 404 in the envelope.
        chunks = await store.read_async(image["storage_key"])
    except KeyError:
        raise NotFound("Image bytes missing from the object store", image_id) from None
    headers = {"Content-Length": str(image["size"]), HASH_HEADER: image["xxh3_128"]}
    return Stream(_stream(chunks, metrics), media_type=image["content_type"], headers=headers)


async def _stream(chunks: AsyncIterator[bytes], metrics: Metrics) -> AsyncIterator[bytes]:
    """The store's bytes, counted; the store's stream closed even on disconnect."""
    try:
        async for chunk in chunks:
            metrics.sync_image_bytes.inc(len(chunk))
            yield chunk
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


@post("/batches/{batch_id:str}/ack", status_code=200)
async def ack_batch(catalog: Catalog, metrics: Metrics, clock: Callable[[], float], batch_id: str) -> Response[bytes]:
    now = clock()
    try:
        batch, drained_now = await catalog.write(lambda c: q.ack(c, batch_id, now))
    except Exception:
        metrics.sync_acks.labels("refused").inc()
        raise
    metrics.sync_acks.labels("drained" if drained_now else "already_drained").inc()
    if drained_now:
        log.info("batch %s drained by a sync job", batch_id)
    return ok(batch)


router = Router(
    path="/api/sync",
    route_handlers=[list_batches, show_batch, batch_manifest, image_bytes, ack_batch],
    guards=[sync_guard],
)
