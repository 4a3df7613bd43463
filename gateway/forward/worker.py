"""The `Forwarder`: drains the outbox to the cloud (SPEC §4), one anyio task with its uploads as children.

Scheduling: every device's pending entries are taken oldest `seq` first; at most
`forward.per_device_in_flight` of a device's entries are in flight (1 by default: strict
per-device order, an entry in backoff holds back the device's later ones), devices are served
round robin, and at most `forward.concurrency` uploads run in total, fewer while the shared
`CloudGate` ramps up after a pause or an outage. Results go to the catalog through
`gateway.forward.outbox` (every transition of an entry lives there). Nothing is marked in
flight in the catalog: on a crash or a stop, what was being sent is simply still pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from gateway.catalog import Catalog, Expected
from gateway.config import Settings
from gateway.devices.keys import KeyUnreadable
from gateway.devices.registry import DeviceRegistry
from gateway.errors import GatewayError
from gateway.forward import outbox
from gateway.forward.backoff import OFFLINE, ByteBucket, CloudGate, backoff_delay
from gateway.forward.cache import ForwardCache
from gateway.forward.client import (
    DELIVERED,
    REJECT,
    RETRY,
    CloudClient,
    CloudUnreachable,
    LocalBytesChanged,
    MultipartUpload,
    Outcome,
)
from gateway.notify import Signal
from gateway.ops.metrics import Metrics
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.forward")

LOOKAHEAD = 32  # entries per device read ahead, so a busy device does not cost a query per upload
LOW_WATER = 8  # a device whose read-ahead falls to this many entries gets its next ones read at once
REFILL_EVERY_S = 15.0
MIN_REFILL_GAP_S = 1.0
MAX_IDLE_S = 5.0
KEY_REFUSED = (401, 403)
# The reason of a dead letter whose device key does not open under the key secret (status, metrics).
KEY_UNREADABLE = "KEY_UNREADABLE"
CHECKIN_TIMEOUT_S = 5.0  # the device waits for this answer


class Forwarder:
    """Sends pending outbox entries to the cloud and records what became of them."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: ObjectStore,
        registry: DeviceRegistry,
        metrics: Metrics,
        client: CloudClient,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        cache: ForwardCache | None = None,
        gate: CloudGate | None = None,
        wake: Signal | None = None,
        on_delivered_bytes: Callable[[int], None] | None = None,
        on_round: Callable[[TaskGroup], None] | None = None,
    ) -> None:
        """`gate`: the cloud's connectivity, shared with the key checker; `wake`: fired when the outbox
        has new work; `on_delivered_bytes`: each delivery's size; `on_round`: called each loop round."""
        f = settings.forward
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.client = client
        self.cache = cache  # local copies of pending images, read before the store
        self.clock = clock
        self.monotonic = monotonic
        self.per_device = f.per_device_in_flight
        self.gate = gate if gate is not None else CloudGate(f.concurrency, f.backoff_base_s, f.backoff_max_s, monotonic)
        self.bucket = ByteBucket(f.bandwidth_bytes_per_s, monotonic)
        self.on_delivered_bytes = on_delivered_bytes  # the status page's throughput
        self.on_round = on_round  # the key checker hangs its quarantine re-checks here
        self.last_success_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._wake = anyio.Event()
        self._queues: dict[str, list[outbox.Entry]] = {}
        self._truncated: set[str] = set()
        self._in_flight: dict[str, str] = {}  # image id -> device id
        self._recording: set[str] = set()  # delivered, the record not yet written
        self._settled: dict[str, outbox.Entry | None] = {}  # results since the last refill began
        self._dirty = True
        self._running_low = False  # a device with more pending than read ahead is nearly out of entries
        self._refilling = False
        self._tg: TaskGroup | None = None  # the uploads' task group, while `run` runs
        self._refilled_at = 0.0
        self._rr_next = 0
        self._probing = False
        if wake is not None:
            wake.listen(self.notify)

    # -- outside world -----------------------------------------------------------------------

    def notify(self) -> None:
        """Something was enqueued or released: look at the outbox again now."""
        self._dirty = True
        self._wake.set()

    @property
    def connectivity(self) -> str:
        return self.gate.state

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- main loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            while True:
                self._wake = anyio.Event()
                try:
                    await self._round(tg)
                except Exception:  # the loop must survive a passing catalog or store error
                    log.exception("forwarder round failed")
                    await anyio.sleep(1.0)
                with anyio.move_on_after(self._idle_s()):
                    await self._wake.wait()

    async def _round(self, tg: TaskGroup) -> None:
        if self.on_round is not None:
            self.on_round(tg)
        if self.gate.state == OFFLINE:
            if self.gate.probe_due() and not self._probing:
                self._probing = True
                tg.start_soon(self._probe)
            return
        since = self.monotonic() - self._refilled_at
        # New uploads mark the queues dirty; while there is work in hand, re-read at most every
        # MIN_REFILL_GAP_S so that a busy ingest does not cost a backlog query per upload.
        # A device running out of read-ahead is read for at once, so that its uploads never stall.
        # The read runs beside the sending: uploads go on from the queues in hand meanwhile.
        if not self._refilling and (since > REFILL_EVERY_S or self._running_low
                                    or (self._dirty and (since > MIN_REFILL_GAP_S or not self._has_due()))):
            self._refilling = True
            tg.start_soon(self._refill_in_background)
        self._dispatch(tg)

    async def _refill_in_background(self) -> None:
        try:
            await self._refill()
        except Exception:  # a passing catalog error: read again a little later
            log.exception("forwarder could not read the outbox")
            self._dirty = True
            await anyio.sleep(1.0)
        finally:
            self._refilling = False
            self._wake.set()

    def _idle_s(self) -> float:
        """How long the loop may sleep before something becomes due (completions wake it sooner)."""
        if self.gate.state == OFFLINE:
            return MAX_IDLE_S if self._probing else max(0.01, min(MAX_IDLE_S, self.gate.wait_s()))
        gate_wait = self.gate.wait_s()
        if gate_wait > 0:
            return min(MAX_IDLE_S, gate_wait)
        if not self.gate.may_send(len(self._in_flight)):
            return MAX_IDLE_S
        wait = MAX_IDLE_S
        if self._dirty:  # a re-read put off by MIN_REFILL_GAP_S
            wait = min(wait, MIN_REFILL_GAP_S - (self.monotonic() - self._refilled_at))
        now = self.clock()
        busy = self._busy()
        for device_id, queue in self._queues.items():
            if busy.get(device_id, 0) >= self.per_device:
                continue
            for entry in queue[: self.per_device]:
                if entry.image_id not in self._in_flight:
                    wait = min(wait, entry.next_attempt_at - now)
                    break
        return max(0.01, wait)

    def _busy(self) -> dict[str, int]:
        busy: dict[str, int] = {}
        for device_id in self._in_flight.values():
            busy[device_id] = busy.get(device_id, 0) + 1
        return busy

    async def _refill(self) -> None:
        self._dirty = self._running_low = False
        self._settled = {}
        fetch = self.per_device + LOOKAHEAD
        entries = await self.catalog.read(lambda c: outbox.pending_heads(c, fetch))
        queues: dict[str, list[outbox.Entry]] = {}
        for entry in entries:
            if entry.image_id in self._recording:  # delivered; its record is on its way
                continue
            if entry.image_id in self._settled:  # finished while the query ran
                newer = self._settled[entry.image_id]
                if newer is None:
                    continue
                entry = newer
            queues.setdefault(entry.device_id, []).append(entry)
        self._queues = queues
        self._truncated = {d for d, q in queues.items() if len(q) >= fetch}
        self._refilled_at = self.monotonic()

    def _dispatch(self, tg: TaskGroup) -> None:
        devices = sorted(self._queues)
        if not devices:
            return
        now = self.clock()
        busy = self._busy()
        started = True
        while started:
            started = False
            for i in range(len(devices)):
                if not self.gate.may_send(len(self._in_flight)):
                    return
                device_id = devices[(self._rr_next + i) % len(devices)]
                if busy.get(device_id, 0) >= self.per_device:
                    continue
                entry = self._next_due(device_id, now)
                if entry is None:
                    continue
                self._in_flight[entry.image_id] = device_id
                busy[device_id] = busy.get(device_id, 0) + 1
                self._rr_next = (self._rr_next + i + 1) % len(devices)
                tg.start_soon(self._forward, entry)
                started = True
                break

    def _has_due(self) -> bool:
        now = self.clock()
        return any(self._next_due(d, now) is not None for d in self._queues)

    def _next_due(self, device_id: str, now: float) -> outbox.Entry | None:
        for entry in self._queues.get(device_id, [])[: self.per_device]:
            if entry.image_id in self._in_flight:
                continue
            return entry if entry.next_attempt_at <= now else None
        return None

    # -- one upload ----------------------------------------------------------------------------

    async def _forward(self, entry: outbox.Entry) -> None:
        try:
            # Announced, so that the catalog writer may wait for this delivery to join a group.
            with self.catalog.expect() as record:
                outcome, cloud_answered = await self._attempt(entry)
                await self._record(entry, outcome, cloud_answered, record)
        except Exception:
            # Most likely the catalog refused the result: hold the entry back a while in memory
            # (it is still pending on disk) rather than resend it in a tight loop.
            log.exception("forwarding %s failed unexpectedly", entry.image_id)
            f = self.settings.forward
            entry.next_attempt_at = self.clock() + backoff_delay(entry.attempts + 1, f.backoff_base_s, f.backoff_max_s)
            self._settle(entry, entry)
        finally:
            self._in_flight.pop(entry.image_id, None)
            self._wake.set()

    async def _attempt(self, entry: outbox.Entry) -> tuple[Outcome, bool]:
        """One attempt; the flag says whether the outcome is the cloud's (it then moves the gate).

        The image comes from the forward cache (from memory when the kernel holds it, else read
        in a worker thread) or, failing that, streamed from the object store; it is posted from
        the event loop, paced under a bandwidth cap. Cancelling the task (shutdown) drops the
        request and its connection."""
        key = self.registry.cached_key_of(entry.device_id)
        if key is None:
            try:
                key = await anyio.to_thread.run_sync(self.registry.key_of, entry.device_id)
            except KeyUnreadable as exc:
                return Outcome(kind=REJECT, error=f"{KEY_UNREADABLE}: device key cannot be opened ({exc}); "
                                                  "check keys.secret_file, then `gateway outbox retry`"), False
        if key is None:
            return Outcome(kind=REJECT, error="no key stored for this device; cannot act as it"), False
        image: bytes | bytearray | AsyncIterable[bytes] | None = None
        if self.cache is not None:
            image = self.cache.read_from_memory(entry.image_id, entry.size, entry.xxh3_128)
            if image is None:
                image = await anyio.to_thread.run_sync(self.cache.read, entry.image_id, entry.size, entry.xxh3_128)
        try:
            if image is None:
                image = await self.store.read_async(entry.storage_key)
        except KeyError:
            return Outcome(kind=REJECT, error="local bytes missing from the object store"), False
        except GatewayError as exc:
            return Outcome(kind=RETRY, error=f"object store: {exc}"), False
        form = MultipartUpload(entry.filename, entry.content_type, entry.size, entry.metadata)
        rate = self.bucket.rate
        try:
            return await self.client.upload(key, form, image, self._pace if rate > 0 else None,
                                            extra_s=form.length / rate if rate > 0 else 0.0), True
        except LocalBytesChanged as exc:
            return Outcome(kind=REJECT, error=f"local bytes changed: {exc}"), False
        except GatewayError as exc:
            return Outcome(kind=RETRY, error=f"object store: {exc}"), False
        finally:
            close = getattr(image, "aclose", None)
            if close is not None:
                await close()

    async def _pace(self, n: int) -> None:
        """Wait until the bandwidth cap lets `n` more bytes go."""
        wait = self.bucket.take(n)
        if wait > 0:
            await anyio.sleep(wait)

    async def _record(self, entry: outbox.Entry, outcome: Outcome, cloud_answered: bool, record: Expected) -> None:
        now = self.clock()
        self.metrics.forward_attempts.labels(_label(outcome, cloud_answered)).inc()
        if outcome.kind == DELIVERED:
            # The cloud holds it: the device's next image may go while this delivery is recorded
            # (a crash before the record means one resend, which the cloud answers 409).
            self._recording.add(entry.image_id)
            self._settle(entry, None)
            self._in_flight.pop(entry.image_id, None)
            if self._tg is not None:
                self._dispatch(self._tg)  # the device's next image now, not after the main loop's next turn
            self._wake.set()
            try:
                await record.write_journaled(outbox.DELIVERIES, outbox.Delivery(
                    image_id=entry.image_id, at=now, status=outcome.status, cloud_image_id=outcome.image_id,
                    cloud_batch_id=outcome.batch_id, cloud_storage_key=outcome.storage_key))
            except BaseException:
                self._dirty = True  # still pending in the catalog: the next refill takes it again
                raise
            finally:
                self._recording.discard(entry.image_id)
            self._settled[entry.image_id] = None  # a refill whose read began before the record skips it
            self.gate.on_success()
            self.metrics.forward_bytes.inc(entry.size)
            self.last_success_at = now
            if self.on_delivered_bytes is not None:
                self.on_delivered_bytes(entry.size)
            return
        record.cancel()  # not a delivery: the writes below are not batched
        self.last_error, self.last_error_at = f"{entry.image_id}: {outcome.error}"[:500], now
        if outcome.kind == RETRY:
            if cloud_answered:
                self.gate.on_retryable(outcome.status, outcome.retry_after_s, outcome.connection_failed)
            attempts = entry.attempts + 1
            max_attempts = self.settings.forward.max_attempts
            if max_attempts and attempts >= max_attempts:
                reason = f"gave up after {attempts} attempts; last: {outcome.error}"
                await self.catalog.write(lambda c: outbox.mark_dead(c, [entry.image_id], now, outcome.status, reason,
                                                                    True))
                self._settle(entry, None)
                return
            f = self.settings.forward
            delay = backoff_delay(attempts, f.backoff_base_s, f.backoff_max_s)
            next_at = now + max(delay, outcome.retry_after_s or 0.0)
            await self.catalog.write(lambda c: outbox.mark_retry(c, entry.image_id, next_at, outcome.status,
                                                                 outcome.error))
            entry.attempts, entry.next_attempt_at = attempts, next_at
            self._settle(entry, entry)
            return
        # Rejected for good. A refused key refuses every upload of the device: dead-letter them all
        # in one go rather than send each (the admin retries them once the key is fixed).
        if cloud_answered:
            self.gate.on_success()  # the cloud answered promptly: it is up
        doomed = [entry.image_id]
        if outcome.status in KEY_REFUSED or outcome.error.startswith(KEY_UNREADABLE):  # all the device's uploads
            doomed += [e.image_id for e in self._queues.get(entry.device_id, []) if e.image_id != entry.image_id
                       and e.image_id not in self._in_flight]
            doomed += await self.catalog.read(lambda c: outbox.device_backlog(c, entry.device_id, outbox.PENDING))
            doomed = list(dict.fromkeys(i for i in doomed if i == entry.image_id or i not in self._in_flight))
        unreadable = outcome.error.startswith(KEY_UNREADABLE)
        reason = (outcome.error if len(doomed) == 1 or unreadable
                  else f"device key refused by the cloud: {outcome.error}")
        await self.catalog.write(
            lambda c: outbox.mark_dead_after_attempt(c, entry.image_id, doomed, now, outcome.status, reason))
        log.warning("dead-lettered %d entr%s of device %s: %s", len(doomed), "y" if len(doomed) == 1 else "ies",
                    entry.device_id, outcome.error[:200])
        for image_id in doomed:
            self._settle_id(entry.device_id, image_id)

    def _settle(self, entry: outbox.Entry, newer: outbox.Entry | None) -> None:
        self._settled[entry.image_id] = newer
        if newer is None:
            self._settle_id(entry.device_id, entry.image_id)
            return
        queue = self._queues.get(entry.device_id, [])
        for i, queued in enumerate(queue):  # a refill may have put a copy read before this result
            if queued.image_id == entry.image_id:
                queue[i] = newer

    def _settle_id(self, device_id: str, image_id: str) -> None:
        """The entry is done with (delivered or dead-lettered): out of the queues, its copy gone."""
        self._settled[image_id] = None
        if self.cache is not None:
            self.cache.drop(image_id)
        queue = self._queues.get(device_id)
        if queue is None:
            return
        queue[:] = [e for e in queue if e.image_id != image_id]
        if device_id in self._truncated and len(queue) <= self.per_device + LOW_WATER:
            self._running_low = True
        if not queue:
            self._queues.pop(device_id, None)

    async def relay_checkin(self, key: str, body: bytes) -> list[Any]:
        """Relay a device's check-in while the cloud is reachable; the cloud's actions, or [] without it."""
        if not self.gate.reachable:
            return []
        try:
            return await self.client.checkin(key, body, timeout_s=min(CHECKIN_TIMEOUT_S, self.client.timeout_s))
        except CloudUnreachable as exc:
            log.info("check-in not relayed: %s", exc)
            return []

    async def relay_heartbeat(self, key: str, body: bytes) -> list[Any]:
        """An agent's heartbeat, relayed like a check-in; the cloud's pending actions, or [] without it."""
        if not self.gate.reachable:
            return []
        try:
            return await self.client.relay_heartbeat(key, body, timeout_s=min(CHECKIN_TIMEOUT_S, self.client.timeout_s))
        except CloudUnreachable as exc:
            log.info("heartbeat not relayed: %s", exc)
            return []

    # -- outage ----------------------------------------------------------------------------------

    async def _probe(self) -> None:
        try:
            key = await anyio.to_thread.run_sync(self._any_key)
            answered = await self.client.probe(key)
            self.gate.on_probe(answered)
            if answered:
                log.info("cloud answers again; resuming with a ramp")
                self._dirty = True
        except Exception:
            log.exception("cloud probe failed unexpectedly")
            self.gate.on_probe(False)
        finally:
            self._probing = False
            self._wake.set()

    def _any_key(self) -> str | None:
        for device_id in list(self._queues):
            try:
                key = self.registry.key_of(device_id)
            except KeyUnreadable:
                continue
            if key is not None:
                return key
        return None


def _label(outcome: Outcome, cloud_answered: bool) -> str:
    if not cloud_answered:
        return "local_error"
    if outcome.kind == DELIVERED:
        return "already_delivered" if outcome.status == 409 else "delivered"
    if outcome.kind == RETRY:
        return "connection_error" if outcome.status is None else "retry"
    return "rejected"
