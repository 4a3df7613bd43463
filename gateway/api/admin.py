"""The admin API: what the CLI uses while a server runs (the catalog file is then locked)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from gateway.api import admin_backup, admin_verify, provision
from gateway.api.auth import require_bearer
from gateway.api.body import read_json_body
from gateway.api.envelope import ok
from gateway.api.sync import list_batches, show_batch  # the same views, behind the admin token here
from gateway.batches import queries as batch_queries
from gateway.catalog import Catalog
from gateway.catalog.collecting import CollectingBatches
from gateway.config import LoadedSettings, Settings
from gateway.config.rows import settings_rows
from gateway.devices.registry import DeviceRegistry
from gateway.errors import ValidationFailed
from gateway.ops.health import Health


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if connection.app.state.offline:
        return
    settings: Settings = connection.app.state.services.settings
    require_bearer(connection, settings.admin.token, "admin")  # type: ignore[arg-type]


class NewDevice(msgspec.Struct, kw_only=True):
    name: str
    key: str | None = None
    device_id: str | None = None
    status: str = "approved"


class DeviceRef(msgspec.Struct):
    ref: str
    on: bool | None = None  # near-dup: switch the device's near-duplicate filter on or off
    name: str | None = None  # rename
    key: str | None = None  # set-key
    force: bool = False  # remove: even with undelivered images


def _decode(raw: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ValidationFailed("Invalid request body", str(exc)) from None


@get("/devices")
async def list_devices(registry: DeviceRegistry) -> Response[bytes]:
    return ok([msgspec.to_builtins(d) for d in registry.all()])


@post("/devices", status_code=201)
async def add_device(request: Request[Any, Any, Any], registry: DeviceRegistry, settings: Settings) -> Response[bytes]:
    body: NewDevice = _decode(await read_json_body(request, settings), NewDevice)
    device, key = await registry.add(body.name, key=body.key, device_id=body.device_id, status=body.status)
    # With forwarding on, a key made here is one the cloud has never seen: the CLI warns.
    return ok({"device": msgspec.to_builtins(device), "key": key, "generated": body.key is None,
               "cloud_url": settings.cloud.url}, status=201)


@post("/devices/{action:str}", status_code=200)
async def change_device(action: str, request: Request[Any, Any, Any], registry: DeviceRegistry,
                        settings: Settings) -> Response[bytes]:
    body: DeviceRef = _decode(await read_json_body(request, settings), DeviceRef)
    if action == "revoke":
        device = await registry.revoke(body.ref)
    elif action in ("approve", "reject"):
        device = await registry.set_status(body.ref, "approved" if action == "approve" else "rejected")
    elif action == "near-dup":
        if body.on is None:
            raise ValidationFailed("Missing field", "near-dup needs `on`: true or false")
        device = await registry.set_near_dup(body.ref, body.on)
    elif action == "rename":
        if body.name is None:
            raise ValidationFailed("Missing field", "rename needs `name`")
        device = await registry.rename(body.ref, body.name)
    elif action == "set-key":
        if body.key is None:
            raise ValidationFailed("Missing field", "set-key needs `key`")
        device = await registry.set_key(body.ref, body.key)
    elif action == "remove":
        device, undelivered = await registry.remove(body.ref, body.force)
        return ok(msgspec.to_builtins(device) | {"dead_lettered": undelivered})
    else:
        raise ValidationFailed("Unknown action", "one of approve, reject, revoke, near-dup, rename, set-key, remove")
    return ok(msgspec.to_builtins(device))


@get("/devices/{ref:str}")
async def show_device(ref: str, registry: DeviceRegistry) -> Response[bytes]:
    device = registry.resolve(ref)
    return ok(msgspec.to_builtins(device) | {"usage": await registry.usage(device.device_id)})


@get("/config")
async def effective_config(settings: Settings, settings_sources: LoadedSettings | None) -> Response[bytes]:
    """The running server's settings, secrets redacted, each with its source (default, file, env)."""
    return ok(settings_rows(settings, settings_sources))


@get("/status")
async def status(health: Health) -> Response[bytes]:
    report = await health.refresh_gauges()
    return ok(msgspec.to_builtins(report))


@post("/batches/{batch_id:str}/seal", status_code=200)
async def seal_batch(catalog: Catalog, collecting: CollectingBatches, batch_sealed: Callable[[str], None],
                     clock: Callable[[], float], batch_id: str) -> Response[bytes]:
    now = clock()
    batch, sealed_now = await catalog.write(lambda c: batch_queries.seal_by_hand(c, collecting, batch_id, now))
    if sealed_now:
        batch_sealed(batch_id)  # offline (CLI on a stopped server): the manifest is written at the next start
    return ok({"batch": batch, "sealed_now": sealed_now})


router = Router(
    path="/api/admin",
    route_handlers=[list_devices, add_device, change_device, show_device, effective_config, status, list_batches,
                    show_batch, seal_batch,
                    *admin_verify.ROUTES, *provision.ADMIN_ROUTES, *admin_backup.ROUTES],
    guards=[admin_guard],
)
