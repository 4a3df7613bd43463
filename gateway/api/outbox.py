"""Admin routes for per-image delivery state: list outbox entries, send dead letters again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.params import Parameter

from gateway.api.admin import admin_guard
from gateway.api.body import read_json_body
from gateway.api.envelope import ok
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.errors import ValidationFailed
from gateway.forward import outbox
from gateway.forward.classes import UplinkPlan
from gateway.notify import Signal

STATES = (outbox.PENDING, outbox.HELD, outbox.DELIVERED, outbox.DEAD, outbox.SKIPPED)


class RetryRequest(msgspec.Struct, kw_only=True):
    all_dead: bool = False
    all_skipped: bool = False  # release every near-duplicate held at the edge
    image_ids: list[str] = msgspec.field(default_factory=list)


@get("/")
async def list_outbox(
    catalog: Catalog,
    uplink: UplinkPlan,
    clock: Callable[[], float],
    wanted: str = Parameter(query="state", default="pending,held,dead,skipped"),  # `state` is reserved by Litestar
    device: str | None = None,
    limit: int = 100,
) -> Response[bytes]:
    states = list(STATES) if wanted == "all" else [s for s in wanted.split(",") if s]
    if not states or any(s not in STATES for s in states):
        raise ValidationFailed("Bad state", f"state is 'all' or a comma-separated list of {', '.join(STATES)}")
    if not 1 <= limit <= 10000:
        raise ValidationFailed("Bad limit", "limit must be in 1..10000")
    rows = await catalog.read(lambda c: outbox.list_entries(c, states, device, limit))
    uplink.annotate(rows, clock())  # which window each waits for
    return ok(rows, meta={"states": states, "limit": limit})


@post("/retry", status_code=200)
async def retry_outbox(request: Request[Any, Any, Any], catalog: Catalog, settings: Settings,
                       clock: Callable[[], float], outbox_changed: Signal) -> Response[bytes]:
    try:
        body = msgspec.json.decode(await read_json_body(request, settings) or b"{}", type=RetryRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValidationFailed("Invalid request body", str(exc)) from None
    if body.all_dead + body.all_skipped + bool(body.image_ids) != 1:
        raise ValidationFailed("Say what to retry", "either all_dead, all_skipped or a list of image_ids")
    now = clock()
    ids = None if body.all_dead else body.image_ids
    retried = 0 if body.all_skipped else await catalog.write(lambda c: outbox.retry_dead(c, ids, now))
    # Held near-duplicates are released by name, or all at once with all_skipped.
    released = 0 if body.all_dead else await catalog.write(
        lambda c: outbox.release_skipped(c, None if body.all_skipped else ids, now))
    outbox_changed.fire()
    asked = "all dead" if body.all_dead else "all skipped" if body.all_skipped else len(body.image_ids)
    return ok({"retried": retried, "released": released, "asked": asked})


router = Router(path="/api/admin/outbox", route_handlers=[list_outbox, retry_outbox], guards=[admin_guard])
