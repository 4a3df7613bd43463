"""The device API, the same contract as the AcuSight cloud: upload, self, check-in, the agent's heartbeat.

Each route also answers under the older `/api/core/device/...` paths some agents use (one handler,
two paths).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post

from gateway.api.body import ClientGone, RequestBody, read_json_body
from gateway.api.envelope import ok
from gateway.config import Settings
from gateway.devices.keycheck import KeyChecker
from gateway.devices.registry import Device, DeviceRegistry
from gateway.errors import DeviceNotApproved, GatewayError, PayloadTooLarge, RequestTimeout, ValidationFailed
from gateway.forward.checkins import CheckinRelay
from gateway.ingest.admission import Admission

# Refusals decided from the headers alone: answered at once, the body left unread (the linger
# middleware in `gateway.api.connections` discards what the client still sends, then closes).
REFUSED_BEFORE_BODY = (401, 403, 429, 503, 507)


async def authenticate(keycheck: KeyChecker, request: Request[Any, Any, Any], require_approved: bool = True) -> Device:
    """The device holding the request's key; keys unknown here may be checked with the cloud (SPEC §3)."""
    return await keycheck.authenticate(request.headers.get("x-device-key"), require_approved)


@post(["/api/device/images/upload", "/api/core/device/images/upload"], status_code=201,
      request_max_body_size=None)  # limits enforced while streaming
async def upload_image(request: Request[Any, Any, Any], admission: Admission, settings: Settings) -> Response[bytes]:
    """HTTP only: the body as a stream, `Admission` decides; on a refusal, drain the body or close."""
    server = settings.server
    body = RequestBody(request.receive, server.read_timeout_s, server.min_body_rate_bytes_per_s)
    headers = request.headers
    try:
        result = await admission.upload(headers.get("x-device-key"), headers.get("content-type"),
                                        headers.get("content-length"), body.chunks())
    except GatewayError as exc:
        if isinstance(exc, PayloadTooLarge | RequestTimeout | ClientGone):
            exc.close_connection = True  # stop reading: never take in an oversized or stalled body
        elif body.received == 0 and not body.done and exc.status in REFUSED_BEFORE_BODY:
            exc.close_connection = True  # refused from the headers: answer now, never read the body
        elif not body.done:
            await body.drain(admission.ceiling)
        raise
    data = {"image_id": result.image_id, "batch_id": result.batch_id, "storage_key": result.storage_key}
    return ok(data, status=server.upload_success_status)


@get(["/api/device/self", "/api/core/device/self"])
async def device_self(request: Request[Any, Any, Any], keycheck: KeyChecker) -> Response[bytes]:
    device = await authenticate(keycheck, request, require_approved=False)
    return ok(device.public())


class CheckinBody(msgspec.Struct):
    status: str = "ok"
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)


@post(["/api/device/checkin", "/api/core/device/checkin"], status_code=200)
async def device_checkin(request: Request[Any, Any, Any], keycheck: KeyChecker, registry: DeviceRegistry,
                         checkins: CheckinRelay, settings: Settings) -> Response[bytes]:
    device = await authenticate(keycheck, request)
    raw = await read_json_body(request, settings)
    try:
        body = msgspec.json.decode(raw or b"{}", type=CheckinBody)
    except msgspec.DecodeError as exc:
        raise ValidationFailed("Invalid check-in body", str(exc)) from None
    except RecursionError:
        raise ValidationFailed("Invalid check-in body", "nested too deeply") from None
    await registry.checkin(device, body.status, body.metrics)
    # Relayed when the cloud is reachable; recorded here either way.
    actions = await checkins.checkin(request.headers.get("x-device-key") or "", raw or b"{}")
    return ok({"actions": actions})


class PendingRequest(msgspec.Struct):
    type: Annotated[str, msgspec.Meta(max_length=200)]
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


class HeartbeatBody(msgspec.Struct):
    device_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    current_model_id: str | None = None
    ip_address: str | None = None
    pending_requests: list[PendingRequest] = msgspec.field(default_factory=list)
    status: str = "ok"


@post("/api/core/agent/checkin", status_code=200)
async def agent_checkin(request: Request[Any, Any, Any], keycheck: KeyChecker, registry: DeviceRegistry,
                        checkins: CheckinRelay, settings: Settings) -> Response[bytes]:
    """The newer agents' heartbeat. Pending devices may send it (a site admin deciding on a new
    device sees its address and model); rejected ones get 403. The key names the device, so a
    `device_id` that differs (an agent registered with `devices add` knows another id) is not refused."""
    device = await authenticate(keycheck, request, require_approved=False)
    if device.status == "rejected":
        raise DeviceNotApproved(details="device status is rejected")
    raw = await read_json_body(request, settings)
    try:
        body = msgspec.json.decode(raw, type=HeartbeatBody)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValidationFailed("Invalid heartbeat body", str(exc)[:300]) from None
    except RecursionError:
        raise ValidationFailed("Invalid heartbeat body", "nested too deeply") from None
    requests = [msgspec.to_builtins(r) for r in body.pending_requests]
    await registry.heartbeat(device, body.status, body.current_model_id, body.ip_address, requests)
    # Relayed when the cloud is reachable; recorded here either way.
    actions = await checkins.heartbeat(request.headers.get("x-device-key") or "", raw)
    # Not enveloped: this is the answer agents expect from the cloud.
    return Response(msgspec.json.encode({"pending_actions": actions, "success": True}), status_code=200,
                    media_type="application/json")


ROUTES = [upload_image, device_self, device_checkin, agent_checkin]
