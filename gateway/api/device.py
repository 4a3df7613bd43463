"""The device API, the same contract as the AcuSight cloud: upload, self, check-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, get, post
from litestar.types import Receive

from gateway.api.envelope import ok
from gateway.devices import Device
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout, ValidationFailed
from gateway.runtime import Gateway


class ClientGone(ValidationFailed):
    default_message = "Client disconnected before the body was complete"


async def body_chunks(receive: Receive, read_timeout: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client silent for `read_timeout` seconds is cut off."""
    while True:
        try:
            with anyio.fail_after(read_timeout):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(details=f"no body bytes for {read_timeout:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def authenticate(gw: Gateway, request: Request[Any, Any, Any]) -> Device:
    return gw.registry.authenticate(request.headers.get("x-device-key"))


@post("/api/device/images/upload", status_code=201)
async def upload_image(request: Request[Any, Any, Any], gw: Gateway) -> Response[bytes]:
    outcome = "INTERNAL_ERROR"
    try:
        device = await authenticate(gw, request)
        gw.rate_limiter.take(device.device_id)
        limits = gw.settings.limits
        declared = request.headers.get("content-length")
        length = int(declared) if declared and declared.isdigit() else 0
        ceiling = limits.max_image_bytes + limits.max_metadata_bytes + 256 * 1024
        if length > ceiling:
            raise PayloadTooLarge("Request body is too large", f"limit is {ceiling} bytes")
        await gw.capacity.check(length)
        await gw.require_store()
        result = await gw.ingestor.upload(
            device, request.headers.get("content-type"),
            body_chunks(request.receive, gw.settings.server.read_timeout_s),
        )
        gw.registry.touch(device, gw.clock())
        if not result.duplicate:
            gw.capacity.accepted(length)
        outcome = "duplicate_accepted" if result.duplicate else "accepted"
        data = {"image_id": result.image_id, "batch_id": result.batch_id, "storage_key": result.storage_key}
        return ok(data, status=gw.settings.server.upload_success_status)
    except GatewayError as exc:
        outcome = exc.code
        raise
    finally:
        gw.metrics.uploads.labels(outcome).inc()


@get("/api/device/self")
async def device_self(request: Request[Any, Any, Any], gw: Gateway) -> Response[bytes]:
    device = gw.registry.lookup(request.headers.get("x-device-key"))
    if device is None or device.revoked:
        gw.registry.check(device)
    assert device is not None
    return ok(device.public())


class CheckinBody(msgspec.Struct):
    status: str = "ok"
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)


@post("/api/device/checkin", status_code=200)
async def device_checkin(request: Request[Any, Any, Any], gw: Gateway) -> Response[bytes]:
    device = await authenticate(gw, request)
    raw = await request.body()
    try:
        body = msgspec.json.decode(raw or b"{}", type=CheckinBody)
    except msgspec.DecodeError as exc:
        raise ValidationFailed("Invalid check-in body", str(exc)) from None
    await gw.registry.checkin(device, body.status, body.metrics)
    return ok({"actions": []})


ROUTES = [upload_image, device_self, device_checkin]
