"""Device keys the gateway does not know, checked with the cloud's `GET /device/self` (SPEC §3).

    unknown key --(cloud: 200, approved)--------------------------> registered, origin 'cloud', accepted
    unknown key --(cloud: 401/403)--------------------------------> refused with the cloud's code (cached 60 s)
    unknown key --(cloud unreachable)-----------------------------> refused 401 INVALID_DEVICE_KEY, or, with
                                                                    cloud.accept_unknown_keys_offline,
                                                                    registered, origin 'quarantine'
    unknown key --(look-up bucket empty)--------------------------> refused 429 RATE_LIMITED, Retry-After
    unknown key --(quarantine holds limits.max_quarantined_devices)> refused 429 RATE_LIMITED, Retry-After
    quarantine  --(the forwarder finds the cloud confirms it)-----> origin 'cloud', held uploads pending
    quarantine  --(the cloud refuses it)--------------------------> revoked, held uploads dead-lettered

Uploads of a quarantined device are stored with their outbox entry `held`. One request per key is
in flight at a time; concurrent uploads with the same new key wait for its answer. Look-ups at the
cloud are rate-limited gateway-wide (a token bucket, `limits.unknown_key_checks_per_minute`), so
many made-up keys cannot flood the cloud; refusals are also remembered per key for a minute.
Both refusals are 429 with Retry-After, not 401: the key may well be good, it could not be checked now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from anyio.abc import TaskGroup

from gateway.catalog import Catalog, Conn
from gateway.config import CloudSettings
from gateway.devices import keys
from gateway.devices.registry import Device, DeviceRegistry
from gateway.errors import Conflict, DeviceNotApproved, GatewayError, InvalidDeviceKey, RateLimited
from gateway.forward import outbox
from gateway.forward.client import CloudClient, KeyAnswer
from gateway.system.ratelimit import DeviceRateLimiter

log = logging.getLogger("gateway.devices.keys")

NEGATIVE_TTL_S = 60.0
MAX_REMEMBERED_REFUSALS = 10_000
VERIFY_TIMEOUT_S = 5.0  # a device waits on this during its upload: keep it short
RECHECK_EVERY_S = 10.0
QUARANTINE = "quarantine"
QUARANTINE_FULL_RETRY_S = 60


class KeyChecker:
    """Authenticates device keys, asking the cloud about the ones the registry does not know."""

    def __init__(
        self,
        registry: DeviceRegistry,
        catalog: Catalog,
        cloud: CloudSettings,
        client: CloudClient | None,
        cloud_reachable: Callable[[], bool] = lambda: True,
        monotonic: Callable[[], float] = time.monotonic,
        recheck_every_s: float = RECHECK_EVERY_S,
        lookups: DeviceRateLimiter | None = None,
        max_quarantined: int | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        """`cloud_reachable`: the forwarder's view of the cloud; `on_released`: held uploads became pending."""
        self.registry = registry
        self.catalog = catalog
        self.settings = cloud
        self.client = client
        self.cloud_reachable = cloud_reachable
        self.monotonic = monotonic
        self.recheck_every_s = recheck_every_s
        self.on_released = on_released
        self._refused: dict[str, tuple[float, GatewayError]] = {}
        self._asking: dict[str, asyncio.Future[Device]] = {}
        self._rechecked_at = 0.0
        self._rechecking = False
        self.lookups = lookups  # gateway-wide bucket of cloud look-ups; None: unlimited
        self.max_quarantined = max_quarantined  # None: unlimited
        self._quarantine_lock = asyncio.Lock()  # the count and the new device, one key at a time

    @property
    def verifying(self) -> bool:
        return self.client is not None and self.settings.verify_unknown_keys

    async def authenticate(self, key: str | None, require_approved: bool = True) -> Device:
        """The device holding `key` (asking the cloud if needed), or the contract's 401/403."""
        device = self.registry.lookup(key)  # raises 401 UNAUTHORIZED without a key
        assert key is not None
        if device is None and self.verifying and keys.is_well_formed(key):
            device = await self._ask_once(key)
        if device is None or device.revoked or require_approved:
            return self.registry.check(device)
        return device

    async def _ask_once(self, key: str) -> Device:
        h = keys.key_hash(key)
        cached = self._refused.get(h)
        if cached is not None:
            if cached[0] > self.monotonic():
                raise cached[1]
            del self._refused[h]
        pending = self._asking.get(h)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Device] = asyncio.get_running_loop().create_future()
        self._asking[h] = fut
        try:
            device = await self._ask(key, h)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._asking[h]
        fut.set_result(device)
        return device

    def _take_lookup(self) -> None:
        """Spend one cloud look-up from the gateway-wide bucket, or refuse with 429 and Retry-After."""
        if self.lookups is not None:
            self.lookups.take("cloud key look-ups")

    def _check_quarantine_room(self) -> None:
        """Refuse (429, Retry-After) a new quarantined device once `max_quarantined` are waiting."""
        if self.max_quarantined is None:
            return
        waiting = sum(1 for d in self.registry.all() if d.origin == QUARANTINE and not d.revoked)
        if waiting >= self.max_quarantined:
            raise RateLimited(
                "Too many unverified devices waiting for the cloud",
                f"{waiting} devices in quarantine (limits.max_quarantined_devices); the key is taken once "
                "the cloud can check it", retry_after=QUARANTINE_FULL_RETRY_S)

    async def _quarantine(self, key: str, answer: KeyAnswer) -> Device:
        async with self._quarantine_lock:
            self._check_quarantine_room()
            return await self._register(key, answer, origin=QUARANTINE)

    async def _ask(self, key: str, h: str) -> Device:
        assert self.client is not None
        reachable = self.cloud_reachable()
        if reachable:
            self._take_lookup()
        answer = (
            await self.client.device_self(key, timeout_s=min(VERIFY_TIMEOUT_S, self.settings.timeout_s))
            if reachable else KeyAnswer(status=None)
        )
        if answer.status == 200 and answer.data and answer.data.get("status") == "approved":
            return await self._register(key, answer, origin="cloud")
        if answer.status in (401, 403):
            error: GatewayError = (
                DeviceNotApproved(details=f"the cloud says: {answer.message}") if answer.status == 403
                or answer.code == DeviceNotApproved.code
                else InvalidDeviceKey(details=f"the cloud does not know this key ({answer.code or answer.status})")
            )
            self._remember_refusal(h, error)
            log.info("cloud refused unknown key %s: %s", keys.redact(key), answer.status)
            raise error
        if answer.status == 200:  # known to the cloud but not approved there
            status = answer.data and answer.data.get("status")
            error = DeviceNotApproved(details=f"the cloud says the device is {status}")
            self._remember_refusal(h, error)
            raise error
        if self.settings.accept_unknown_keys_offline:
            device = await self._quarantine(key, answer)
            log.warning("cloud unreachable; unknown key %s taken into quarantine", keys.redact(key))
            return device
        raise InvalidDeviceKey(details="the key is not known here and could not be verified with the cloud")

    def _remember_refusal(self, h: str, error: GatewayError) -> None:
        now = self.monotonic()
        if len(self._refused) >= MAX_REMEMBERED_REFUSALS:  # many distinct bad keys: forget the expired
            self._refused = {k: v for k, v in self._refused.items() if v[0] > now}
        if len(self._refused) < MAX_REMEMBERED_REFUSALS:
            self._refused[h] = (now + NEGATIVE_TTL_S, error)

    async def _register(self, key: str, answer: KeyAnswer, origin: str) -> Device:
        data = answer.data or {}
        name = str(data.get("name") or f"{origin} device {keys.redact(key)}")
        cloud_id = data.get("device_id") if isinstance(data.get("device_id"), str) else None
        device_id = cloud_id if cloud_id and self.registry.get(cloud_id) is None else None
        try:
            device, _ = await self.registry.add(
                name, key=key, device_id=device_id, status="approved", origin=origin,
                organization_id=str(data.get("organization_id") or "") or None,
            )
        except Conflict:  # registered meanwhile by another path
            found = self.registry.lookup(key)
            if found is None:
                raise
            return found
        log.info("registered device %s (origin %s) for key %s", device.device_id, origin, keys.redact(key))
        return device

    # -- quarantine ------------------------------------------------------------------------------

    def maybe_recheck(self, tg: TaskGroup) -> None:
        """Called by the forwarder each round: now and then, ask the cloud about quarantined keys."""
        if self.client is None or self._rechecking or not self.cloud_reachable():
            return
        if self.monotonic() - self._rechecked_at < self.recheck_every_s:
            return
        if not any(d.origin == QUARANTINE and not d.revoked for d in self.registry.all()):
            return
        self._rechecking = True
        tg.start_soon(self._recheck_all)

    async def _recheck_all(self) -> None:
        try:
            for device in [d for d in self.registry.all() if d.origin == QUARANTINE and not d.revoked]:
                await self.recheck(device)
        except Exception:
            log.exception("quarantine re-check failed")
        finally:
            self._rechecked_at = self.monotonic()
            self._rechecking = False

    async def recheck(self, device: Device) -> str:
        """Ask the cloud about one quarantined device; returns what became of it."""
        assert self.client is not None
        try:
            key = self.registry.key_of(device.device_id)
        except keys.KeyUnreadable:
            return "key-unreadable"
        if key is None:
            return "no-key"
        answer = await self.client.device_self(key)
        now = time.time()
        if answer.status == 200 and answer.data and answer.data.get("status") == "approved":
            await self.registry.set_origin(device.device_id, "cloud", str(answer.data.get("organization_id") or "")
                                           or None)
            released = await self.catalog.write(lambda c: outbox.release_held(c, device.device_id, now))
            log.info("cloud confirmed quarantined device %s; %d upload(s) released", device.device_id, released)
            if self.on_released is not None:
                self.on_released()
            return "confirmed"
        if answer.status in (401, 403) or answer.status == 200:
            reason = f"device key refused by the cloud: HTTP {answer.status} {answer.code} {answer.message}".strip()

            def op(c: Conn) -> int:
                held = outbox.device_backlog(c, device.device_id, outbox.HELD)
                return outbox.mark_dead(c, held, now, answer.status, reason, False)

            dead = await self.catalog.write(op)
            await self.registry.revoke(device.device_id)
            log.warning("cloud refused quarantined device %s; revoked, %d upload(s) dead-lettered",
                        device.device_id, dead)
            return "refused"
        return "unreachable"
