"""Admin routes for catalog journal records DuckDB refused (`gateway journal quarantine ...`)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post

from gateway.api.admin import admin_guard
from gateway.api.envelope import ok
from gateway.catalog import Catalog
from gateway.catalog.quarantine import Quarantined, held
from gateway.errors import NotFound, ValidationFailed

log = logging.getLogger("gateway.catalog")


class Choice(msgspec.Struct, kw_only=True):
    all: bool = False
    ids: list[str] = msgspec.field(default_factory=list)


def _view(record: Quarantined) -> dict[str, Any]:
    return {"id": record.id, "at": record.at, "reason": record.reason, "held": held(record)}


async def _choice(request: Request[Any, Any, Any], catalog: Catalog, allow_all: bool) -> set[str] | None:
    try:
        body = msgspec.json.decode(await request.body() or b"{}", type=Choice)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValidationFailed("Invalid request body", str(exc)) from None
    if body.all == bool(body.ids) or (body.all and not allow_all):
        raise ValidationFailed("Say which records", "a list of ids" + (" or all" if allow_all else ""))
    if body.all:
        return None
    known = {r.id for r in catalog.quarantine.records()}
    if unknown := sorted(set(body.ids) - known):
        raise NotFound("No such quarantined record", ", ".join(unknown)[:200])
    return set(body.ids)


@get("/")
async def list_quarantine(catalog: Catalog) -> Response[bytes]:
    return ok([_view(r) for r in catalog.quarantine.records()])


@post("/apply", status_code=200)
async def apply_quarantine(request: Request[Any, Any, Any], catalog: Catalog) -> Response[bytes]:
    ids = await _choice(request, catalog, allow_all=True)
    applied, refused = await catalog.apply_quarantined(ids)
    for record in applied:
        log.info("journal quarantine: record %s applied to the catalog (%s)", record.id, held(record))
    return ok({"applied": [_view(r) for r in applied], "refused": refused})


@post("/drop", status_code=200)
async def drop_quarantine(request: Request[Any, Any, Any], catalog: Catalog) -> Response[bytes]:
    ids = await _choice(request, catalog, allow_all=False)
    assert ids is not None
    dropped = catalog.quarantine.remove(ids)
    for record in dropped:  # what it acknowledged stays findable in the log
        log.warning("journal quarantine: record %s dropped by an admin; it held %s (reason: %s)",
                    record.id, held(record), record.reason[:300])
    return ok({"dropped": [_view(r) for r in dropped]})


router = Router(path="/api/admin/journal/quarantine", route_handlers=[list_quarantine, apply_quarantine,
                                                                      drop_quarantine], guards=[admin_guard])
