"""Devices and their keys: registration, approval, revocation, authentication and check-ins.

The registry keeps every device in memory by key hash (devices are few; one look-up per upload
must not touch the catalog) and writes every change through the catalog first.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from gateway.catalog import Catalog, Conn
from gateway.devices import keys
from gateway.errors import (
    Conflict,
    DeviceNotApproved,
    InvalidDeviceKey,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    ValidationFailed,
)

STATUSES = ("pending", "approved", "rejected")
MAX_METRICS_BYTES = 65536  # a check-in's metrics, as stored (JSON); more is refused, never cut


class Device(msgspec.Struct, kw_only=True):
    device_id: str
    name: str
    organization_id: str
    status: str
    revoked: bool = False
    origin: str = "local"
    created_at: float = 0.0
    last_seen_at: float | None = None
    last_status: str | None = None
    last_model_id: str | None = None  # the rest as the last heartbeat (POST /api/core/agent/checkin) gave it
    last_ip: str | None = None
    pending_requests: list[Any] = msgspec.field(default_factory=list)
    device_info: dict[str, Any] | None = None  # what the device said of itself when provisioned
    near_dup_exempt: bool = False  # its frames are never compared (e.g. different parts on one background)

    def public(self) -> dict[str, Any]:
        """The `GET /device/self` view."""
        return {
            "device_id": self.device_id,
            "endpoint_id": self.device_id,
            "organization_id": self.organization_id,
            "status": self.status,
            "name": self.name,
        }


_COLUMNS = ("device_id, name, organization_id, status, revoked, origin, created_at, last_seen_at, last_status, "
            "last_model_id, last_ip, pending_requests, device_info, near_dup_exempt")


def _row_to_device(row: tuple[Any, ...]) -> Device:
    return Device(
        device_id=row[0], name=row[1], organization_id=row[2], status=row[3], revoked=bool(row[4]),
        origin=row[5], created_at=row[6], last_seen_at=row[7], last_status=row[8], last_model_id=row[9],
        last_ip=row[10], pending_requests=json.loads(row[11]) if row[11] else [],
        device_info=json.loads(row[12]) if row[12] else None,
        near_dup_exempt=bool(row[13]),
    )


class KeySealing(Protocol):
    """What the registry needs of the key secret (`keys.KeyBox`, or `keysecret.KeySecret` opened at start)."""

    def seal(self, key: str) -> bytes: ...

    def open(self, sealed: bytes) -> str: ...


class DeviceRegistry:
    def __init__(self, catalog: Catalog, keybox: KeySealing, organization_id: str, clock: Callable[[], float]) -> None:
        self.catalog = catalog
        self.keybox = keybox
        self.organization_id = organization_id
        self.clock = clock
        self._by_hash: dict[str, Device] = {}
        self._hash_by_id: dict[str, str] = {}
        self._keys: dict[str, str] = {}  # device id -> key in clear, for the forwarder

    async def load(self) -> None:
        rows = await self.catalog.read(lambda c: c.execute(f"SELECT key_hash, {_COLUMNS} FROM devices").fetchall())
        self._by_hash = {r[0]: _row_to_device(r[1:]) for r in rows}
        self._hash_by_id = {d.device_id: h for h, d in self._by_hash.items()}

    # -- authentication --------------------------------------------------------------------

    def lookup(self, key: str | None) -> Device | None:
        """The device holding `key`, whatever its status; None when unknown."""
        if not key:
            raise Unauthorized("Missing X-Device-Key header")
        return self._by_hash.get(keys.key_hash(key))

    @staticmethod
    def check(device: Device | None) -> Device:
        if device is None or device.revoked:
            raise InvalidDeviceKey()
        if device.status != "approved":
            raise DeviceNotApproved(details=f"device status is {device.status}")
        return device

    def cached_key_of(self, device_id: str) -> str | None:
        """The device's key if `key_of` already has it in memory (no catalog read: for the event loop)."""
        return self._keys.get(device_id)

    def key_of(self, device_id: str) -> str | None:
        """The device's key in clear, for the forwarder to act as the device (None if not stored)."""
        cached = self._keys.get(device_id)
        if cached is not None:
            return cached
        h = self._hash_by_id.get(device_id)
        if h is None:
            return None
        sealed = self.catalog.read_sync(
            lambda c: c.execute("SELECT key_sealed FROM devices WHERE key_hash = ?", [h]).fetchone()
        )
        if sealed is None or sealed[0] is None:
            return None
        # Opened once; `set_key` replaces the cached one.
        key = self._keys[device_id] = self.keybox.open(bytes(sealed[0]))
        return key

    def get(self, device_id: str) -> Device | None:
        h = self._hash_by_id.get(device_id)
        return self._by_hash.get(h) if h else None

    def all(self) -> list[Device]:
        return sorted(self._by_hash.values(), key=lambda d: (d.created_at, d.device_id))

    # -- administration --------------------------------------------------------------------

    async def add(
        self,
        name: str,
        key: str | None = None,
        device_id: str | None = None,
        status: str = "approved",
        origin: str = "local",
        organization_id: str | None = None,
        device_info: dict[str, Any] | None = None,
    ) -> tuple[Device, str]:
        """Register a device; returns it and its key (generated unless given)."""
        if not name.strip():
            raise ValidationFailed("Device name is empty")
        if status not in STATUSES:
            raise ValidationFailed("Bad status", f"status must be one of {', '.join(STATUSES)}")
        key = key.strip() if key else keys.generate_key()
        if not keys.is_well_formed(key):
            raise ValidationFailed("Bad device key", "keys look like adk_ followed by 32 lowercase hex characters")
        device_id = device_id or f"dev_{uuid.uuid4()}"
        h = keys.key_hash(key)
        if h in self._by_hash:
            raise Conflict("Key already registered", f"device {self._by_hash[h].device_id}")
        if device_id in self._hash_by_id:
            raise Conflict("Device id already registered", device_id)
        device = Device(
            device_id=device_id, name=name.strip(), organization_id=organization_id or self.organization_id,
            status=status, origin=origin, created_at=self.clock(), device_info=device_info,
        )
        sealed = self.keybox.seal(key)
        info = json.dumps(device_info, separators=(",", ":")) if device_info is not None else None

        def op(c: Conn) -> None:
            c.execute(
                "INSERT INTO devices (device_id, name, organization_id, status, revoked, origin, key_hash, "
                "key_sealed, created_at, device_info) VALUES (?, ?, ?, ?, false, ?, ?, ?, ?, ?)",
                [device.device_id, device.name, device.organization_id, device.status, device.origin, h, sealed,
                 device.created_at, info],
            )

        await self.catalog.write(op)
        self._by_hash[h] = device
        self._hash_by_id[device.device_id] = h
        return device, key

    def resolve(self, ref: str) -> Device:
        """A device by id, key or unique name (surrounding whitespace ignored, as a pasted key may carry)."""
        ref = ref.strip()
        device = self._by_hash.get(keys.key_hash(ref)) if ref.startswith("adk_") else self.get(ref)
        if device is None and not ref.startswith("adk_"):  # a name, when no other device shares it
            named = [d for d in self._by_hash.values() if d.name == ref]
            if len(named) > 1:
                raise Conflict("Several devices have this name", f"{ref}: use a device id "
                               f"({', '.join(d.device_id for d in named)})")
            device = named[0] if named else None
        if device is None:
            raise NotFound("No such device", ref if not ref.startswith("adk_") else keys.redact(ref))
        return device

    async def set_status(self, ref: str, status: str) -> Device:
        if status not in STATUSES:
            raise ValidationFailed("Bad status", f"status must be one of {', '.join(STATUSES)}")
        device = self.resolve(ref)
        await self.catalog.write(
            lambda c: c.execute("UPDATE devices SET status = ? WHERE device_id = ?", [status, device.device_id])
        )
        device.status = status
        return device

    async def set_origin(self, device_id: str, origin: str, organization_id: str | None = None) -> None:
        device = self.resolve(device_id)
        org = organization_id or device.organization_id
        await self.catalog.write(
            lambda c: c.execute(
                "UPDATE devices SET origin = ?, organization_id = ? WHERE device_id = ?", [origin, org, device_id]
            )
        )
        device.origin, device.organization_id = origin, org

    async def set_near_dup(self, ref: str, on: bool) -> Device:
        """Switch the near-duplicate filter on or off for one device (off: exempt)."""
        device = self.resolve(ref)
        await self.catalog.write(lambda c: c.execute(
            "UPDATE devices SET near_dup_exempt = ? WHERE device_id = ?", [not on, device.device_id]))
        device.near_dup_exempt = not on
        return device

    async def revoke(self, ref: str) -> Device:
        device = self.resolve(ref)
        await self.catalog.write(
            lambda c: c.execute("UPDATE devices SET revoked = true WHERE device_id = ?", [device.device_id])
        )
        device.revoked = True
        return device

    async def rename(self, ref: str, name: str) -> Device:
        device = self.resolve(ref)
        if not name.strip():
            raise ValidationFailed("Device name is empty")
        new = name.strip()
        await self.catalog.write(
            lambda c: c.execute("UPDATE devices SET name = ? WHERE device_id = ?", [new, device.device_id]))
        device.name = new
        return device

    async def set_key(self, ref: str, key: str) -> Device:
        """Give a device another key (e.g. the one the cloud knows it by); the old key stops working."""
        device = self.resolve(ref)
        key = key.strip()
        if not keys.is_well_formed(key):
            raise ValidationFailed("Bad device key", "keys look like adk_ followed by 32 lowercase hex characters")
        h = keys.key_hash(key)
        other = self._by_hash.get(h)
        if other is not None and other is not device:
            raise Conflict("Key already registered", f"device {other.device_id}")
        sealed = self.keybox.seal(key)
        await self.catalog.write(lambda c: c.execute(
            "UPDATE devices SET key_hash = ?, key_sealed = ? WHERE device_id = ?", [h, sealed, device.device_id]))
        old = self._hash_by_id[device.device_id]
        self._by_hash.pop(old, None)
        self._by_hash[h] = device
        self._hash_by_id[device.device_id] = h
        self._keys[device.device_id] = key
        return device

    async def remove(self, ref: str, force: bool = False) -> tuple[Device, int]:
        """Forget a device. Refused while it has undelivered images (pending, held or dead-lettered)
        unless `force`, which dead-letters them; returns the device and how many were undelivered."""
        device = self.resolve(ref)
        (undelivered,) = await self.catalog.read(lambda c: c.execute(
            "SELECT count(*) FROM outbox WHERE device_id = ? AND state <> 'delivered'", [device.device_id]
        ).fetchone()) or (0,)
        if undelivered and not force:
            raise Conflict("Device has undelivered images",
                           f"{undelivered} image(s) of {device.device_id} not delivered to the cloud yet; wait, "
                           "fix its key (devices set-key, then outbox retry), or remove it with --force")

        def op(c: Conn) -> None:
            c.execute("UPDATE outbox SET state = 'dead', last_error = 'device removed' "
                      "WHERE device_id = ? AND state IN ('pending', 'held')", [device.device_id])
            c.execute("DELETE FROM devices WHERE device_id = ?", [device.device_id])

        await self.catalog.write(op)
        h = self._hash_by_id.pop(device.device_id, None)
        if h is not None:
            self._by_hash.pop(h, None)
        self._keys.pop(device.device_id, None)
        return device, int(undelivered)

    async def usage(self, device_id: str) -> dict[str, int]:
        """A device's images and its outbox entries by state, for `devices show`."""
        def q(c: Conn) -> dict[str, int]:
            (images,) = c.execute("SELECT count(*) FROM images WHERE device_id = ?", [device_id]).fetchone() or (0,)
            rows = c.execute("SELECT state, count(*) FROM outbox WHERE device_id = ? GROUP BY state",
                             [device_id]).fetchall()
            return {"images": int(images)} | {str(s): int(n) for s, n in rows}

        return await self.catalog.read(q)

    async def checkin(self, device: Device, status: str, metrics: dict[str, Any]) -> None:
        now = self.clock()
        blob = json.dumps(metrics, separators=(",", ":"))
        if len(blob.encode()) > MAX_METRICS_BYTES:  # cut, it would no longer be JSON
            raise PayloadTooLarge("Check-in metrics are too large",
                                  f"{len(blob.encode())} bytes as JSON, limit {MAX_METRICS_BYTES}")
        await self.catalog.write(
            lambda c: c.execute(
                "UPDATE devices SET last_seen_at = ?, last_status = ?, last_metrics = ? WHERE device_id = ?",
                [now, status[:200], blob, device.device_id],
            )
        )
        device.last_seen_at, device.last_status = now, status[:200]

    async def heartbeat(self, device: Device, status: str, model_id: str | None, ip: str | None,
                        pending_requests: list[Any]) -> None:
        """Record an agent's heartbeat: last seen, status, model, LAN address and its pending requests
        (replacing the previous heartbeat's: the agent reports what is pending now)."""
        now = self.clock()
        status, model_id, ip = status[:200], model_id[:200] if model_id else None, ip[:64] if ip else None
        blob = json.dumps(pending_requests, separators=(",", ":"))
        await self.catalog.write(
            lambda c: c.execute(
                "UPDATE devices SET last_seen_at = ?, last_status = ?, last_model_id = ?, last_ip = ?, "
                "pending_requests = ? WHERE device_id = ?",
                [now, status, model_id, ip, blob, device.device_id],
            )
        )
        device.last_seen_at, device.last_status = now, status
        device.last_model_id, device.last_ip, device.pending_requests = model_id, ip, pending_requests

    def touch(self, device: Device, now: float) -> None:
        """Note an upload as the device's last sign of life (kept in memory; check-ins persist it)."""
        device.last_seen_at = now
