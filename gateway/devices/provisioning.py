"""Provisioning: a device's setup script swaps a token for its key (`POST /api/devices/provision`).

Two modes (`[provisioning] mode`):
- `relay`: the request goes to the cloud's `/devices/provision` as received; on success the cloud's
  key is registered here under the cloud's device id (and its status, else `default_status`), and
  the answer's `api_endpoint` becomes `server.external_url` (else the URL the request came in on), so the
  device talks to the gateway.
  The cloud's refusals reach the device as they came; no answer at all is 503, and nothing is registered.
- `local`: tokens from `gateway tokens create` (`provision_tokens.py`); the device gets a new `adk_`
  key and `default_status`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec

from gateway.config import Settings
from gateway.devices import keys
from gateway.devices.registry import STATUSES, DeviceRegistry
from gateway.devices.tokens import TokenStore
from gateway.envelope import read_envelope
from gateway.errors import BadGateway, Conflict, DeviceExists, ServiceUnavailable, ValidationFailed
from gateway.forward.client import CloudClient, CloudUnreachable, RelayedAnswer
from gateway.system.ratelimit import DeviceRateLimiter

log = logging.getLogger("gateway.devices.provisioning")

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_DEVICE_INFO_BYTES = 16 * 1024
RELAY_TIMEOUT_S = 15.0  # the setup script waits for this answer
RELAY_RETRY_AFTER_S = 30


class ProvisionRequest(msgspec.Struct):
    token: str
    device_info: dict[str, Any]
    ip_address: str | None = None


class CloudAnswered(Exception):
    """The cloud refused a relayed request: its answer goes to the device unchanged."""

    def __init__(self, answer: RelayedAnswer) -> None:
        super().__init__(f"HTTP {answer.status}")
        self.answer = answer


def parse_request(raw: bytes) -> ProvisionRequest:
    """The request, checked: 400 VALIDATION_ERROR for anything a device id or key cannot be made of."""
    try:
        req = msgspec.json.decode(raw, type=ProvisionRequest)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ValidationFailed("Invalid provisioning request", str(exc)[:300]) from None
    info = req.device_info
    device_id = info.get("device_id")
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise ValidationFailed("Invalid provisioning request",
                               "device_info.device_id must be 1-128 letters, digits or ._:- (starting with a letter "
                               "or digit)")
    for field in ("name", "agent_version"):
        value = info.get(field)
        if value is not None and (not isinstance(value, str) or len(value) > 200):
            raise ValidationFailed("Invalid provisioning request", f"device_info.{field} must be a string of at most "
                                   "200 characters")
    if req.ip_address is not None and len(req.ip_address) > 64:
        raise ValidationFailed("Invalid provisioning request", "ip_address is longer than 64 characters")
    if len(msgspec.json.encode(info)) > MAX_DEVICE_INFO_BYTES:
        raise ValidationFailed("Invalid provisioning request", f"device_info is over {MAX_DEVICE_INFO_BYTES} bytes")
    return req


class Provisioner:
    """Swaps provisioning tokens for device keys, locally or through the cloud."""

    def __init__(self, settings: Settings, registry: DeviceRegistry, tokens: TokenStore, cloud: CloudClient | None,
                 limiter: DeviceRateLimiter) -> None:
        self.settings = settings
        self.registry = registry
        self.tokens = tokens
        self.cloud = cloud
        self.limiter = limiter
        self.mode = settings.provisioning_mode

    def admit(self, client: str) -> None:
        """Count one request from `client` (its address): 429 RATE_LIMITED past the limit."""
        self.limiter.take(client)

    async def provision(self, raw: bytes, own_endpoint: str) -> tuple[dict[str, Any], int]:
        """The answer's data and status. `own_endpoint`: the device base URL this request came in on,
        given to the device when `server.external_url` is not set."""
        req = parse_request(raw)
        if self.mode == "relay":
            return await self._relay(raw, req, self.settings.server.external_url or own_endpoint)
        return await self._local(req, self.settings.server.external_url or own_endpoint), 201

    async def _local(self, req: ProvisionRequest, endpoint: str) -> dict[str, Any]:
        token = await self.tokens.check(req.token)
        device_id = str(req.device_info["device_id"])
        if self.registry.get(device_id) is not None:
            raise DeviceExists(details=device_id)
        await self.tokens.claim(token.token_id)
        status = self.settings.provisioning.default_status
        try:
            device, key = await self.registry.add(
                str(req.device_info.get("name") or device_id), device_id=device_id, status=status,
                device_info=_kept_info(req),
            )
        except Conflict:  # registered meanwhile by another request
            await self.tokens.unclaim(token.token_id)
            raise DeviceExists(details=device_id) from None
        log.info("device %s provisioned with token %s (%s), status %s", device.device_id, token.token_id, token.name,
                 device.status)
        return {"device_id": device.device_id, "endpoint_id": device.device_id, "api_key": key,
                "api_endpoint": endpoint}

    async def _relay(self, raw: bytes, req: ProvisionRequest, endpoint: str) -> tuple[dict[str, Any], int]:
        assert self.cloud is not None  # relay mode needs cloud.url (checked with the settings)
        try:
            answer = await self.cloud.relay_provision(raw, timeout_s=min(RELAY_TIMEOUT_S, self.cloud.timeout_s))
        except CloudUnreachable as exc:
            log.warning("provisioning not relayed, the cloud cannot be reached: %s", exc)
            raise ServiceUnavailable("The cloud cannot be reached to provision this device", str(exc)[:200],
                                     retry_after=RELAY_RETRY_AFTER_S) from None
        if not 200 <= answer.status < 300:
            raise CloudAnswered(answer)
        data = read_envelope(answer.body).data_dict()
        device_id, key = data.get("device_id"), data.get("api_key")
        if not isinstance(device_id, str) or not device_id or not isinstance(key, str) or not keys.is_well_formed(key):
            log.error("the cloud provisioned a device but its answer has no usable device_id and api_key")
            raise BadGateway(details="the cloud's answer has no usable device_id and api_key")
        cloud_status = data.get("status")
        status = cloud_status if cloud_status in STATUSES else self.settings.provisioning.default_status
        try:
            await self.registry.add(
                str(req.device_info.get("name") or device_id), key=key, device_id=device_id, status=status,
                origin="cloud", organization_id=str(data.get("organization_id") or "") or None,
                device_info=_kept_info(req),
            )
        except Conflict as exc:
            log.warning("the cloud provisioned device %s, but it is registered here already (%s)", device_id,
                        exc.details)
            raise DeviceExists("The cloud provisioned this device, but it is registered on this gateway already",
                               device_id) from None
        log.info("device %s provisioned through the cloud, status %s", device_id, status)
        data["api_endpoint"] = endpoint
        data.setdefault("endpoint_id", device_id)
        return data, answer.status


def _kept_info(req: ProvisionRequest) -> dict[str, Any]:
    """What is kept of the device's own description: all of `device_info`, and its address."""
    info = dict(req.device_info)
    if req.ip_address is not None:
        info.setdefault("ip_address", req.ip_address)
    return info


