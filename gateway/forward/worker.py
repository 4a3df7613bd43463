"""The `Forwarder`: drains the outbox to the cloud (SPEC §4), one anyio task with its uploads as children.

Scheduling (`gateway.forward.lanes`): one lane per device and priority class, each sent oldest
`seq` first with at most `forward.per_device_in_flight` in flight (1 by default: strict order, an
entry in backoff holds back its lane's later ones); higher classes first, lanes of a class in turn,
only classes the current window sends (`gateway.forward.windows`) at its cap; at most
`forward.concurrency` uploads run in total, fewer while the shared `CloudGate` ramps up after a
pause or an outage. Before lower classes go on, the outbox is read again after an upload of a
higher class arrives and after an outage (`_hold`). Results go through `gateway.forward.outbox`
(every transition of an entry). Nothing is marked in flight: after a crash it is still pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from gateway.catalog import Catalog, Expected
from gateway.catalog.records import OutboxDelivered
from gateway.config import Settings
from gateway.devices.keys import KeyUnreadable
from gateway.devices.registry import DeviceRegistry
from gateway.forward import connectivity, outbox
from gateway.forward.attempt import KEY_UNREADABLE, Sender, outcome_label
from gateway.forward.backoff import OFFLINE, ByteBucket, CloudGate
from gateway.forward.cache import ForwardCache
from gateway.forward.classes import UplinkPlan
from gateway.forward.client import (
    DELIVERED,
    RETRY,
    CloudClient,
    CloudUnreachable,
    Outcome,
)
from gateway.forward.lanes import Lane, Lanes
from gateway.forward.windows import Moment
from gateway.ingest.storing import StoringImages
from gateway.notify import Signal
from gateway.ops.metrics import Metrics
from gateway.retries import cloud_policy
from gateway.storage import ObjectStore

log = logging.getLogger("gateway.forward")

LOOKAHEAD = 32  # entries per device read ahead, so a busy device does not cost a query per upload
LOW_WATER = 8  # a device whose read-ahead falls to this many entries gets its next ones read at once
REFILL_EVERY_S = 15.0
MIN_REFILL_GAP_S = 1.0
MAX_IDLE_S = 5.0
KEY_REFUSED = (401, 403)
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
        uplink: UplinkPlan | None = None,
        gate: CloudGate | None = None,
        wake: Signal | None = None,
        on_delivered_bytes: Callable[[int], None] | None = None,
        on_round: Callable[[TaskGroup], None] | None = None,
        storing: StoringImages | None = None,
    ) -> None:
        """`gate`: the cloud's connectivity, shared with the key checker; `wake`: fired when the outbox
        has new work; `on_delivered_bytes`: each delivery's size; `on_round`: called each loop round; `storing`: images
        recorded whose objects are not yet stored, left alone until they are (its signal wakes this)."""
        f = settings.forward
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.client = client
        self.cache = cache  # local copies of pending images, read before the store
        self.sender = Sender(registry, store, client, cache)
        self.clock = clock
        self.monotonic = monotonic
        self.per_device = f.per_device_in_flight
        self.gate = gate if gate is not None else CloudGate(f.concurrency, f.backoff_base_s, f.backoff_max_s, monotonic)
        self.retry = cloud_policy(f)
        self.uplink = uplink or UplinkPlan.from_settings(f)
        self.uplink.listen(self._arrived)
        self.lanes = Lanes(self.uplink, self.per_device, LOW_WATER)
        self.bucket = ByteBucket(self.uplink.schedule.at(clock()).cap, monotonic)
        self.on_delivered_bytes = on_delivered_bytes  # the status page's throughput
        self.on_round = on_round  # the key checker hangs its quarantine re-checks here
        self.last_success_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.storing = storing if storing is not None else StoringImages()
        self._wake = anyio.Event()
        self._recording: set[str] = set()  # delivered, the record not yet written
        self._settled: dict[str, outbox.Entry | None] = {}  # results since the last refill began
        self._dirty = True
        self._refilling = False
        # Classes below this priority wait until a read of the outbox begun after generation `_hold[1]`
        # has finished: an upload of a higher class arrived, or an outage ended, since the last read.
        self._hold: tuple[float, int] | None = None
        self._generation = 0
        self._tg: TaskGroup | None = None  # the uploads' task group, while `run` runs
        self._refilled_at = 0.0
        self._probing = False
        self.offline_since: float | None = None  # when the cloud went offline (for the log line)
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
        return len(self.lanes.in_flight)

    def _arrived(self, priority: int) -> None:
        """An upload of a class above the lowest was acknowledged (`UplinkPlan.arrived`)."""
        lowest = self.lanes.lowest_priority()
        if lowest is not None and lowest < priority:
            self._hold_until_read(priority)

    def _hold_until_read(self, priority: float) -> None:
        self._generation += 1
        self._hold = (max(priority, self._hold[0] if self._hold else priority), self._generation)
        self.notify()

    def _moment(self, now: float) -> Moment:
        """The window now; a window's cap takes effect for uploads that start from now on."""
        moment = self.uplink.schedule.at(now)
        if moment.cap != self.bucket.rate:
            self.bucket = ByteBucket(moment.cap, self.monotonic)
        return moment

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
        if not self._refilling and (since > REFILL_EVERY_S or self.lanes.running_low or self._hold is not None
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
        now = self.clock()
        moment = self._moment(now)
        wait = MAX_IDLE_S if moment.next_change_at is None else moment.next_change_at - now  # a window's edge
        if gate_wait > 0:
            return max(0.01, min(wait, gate_wait))
        if not self.gate.may_send(self.in_flight):
            return max(0.01, wait)
        if self._dirty:  # a re-read put off by MIN_REFILL_GAP_S
            wait = min(wait, MIN_REFILL_GAP_S - (self.monotonic() - self._refilled_at))
        hold = float("-inf") if self._hold is None else self._hold[0]  # the read it waits for wakes the loop
        return max(0.01, self.lanes.due_in(now, moment, wait, hold))

    async def _refill(self) -> None:
        self._dirty = self.lanes.running_low = False
        self._settled = {}
        generation = self._generation
        fetch = self.per_device + LOOKAHEAD
        entries = await self.catalog.read(lambda c: outbox.pending_heads(c, fetch))
        queues: dict[Lane, list[outbox.Entry]] = {}
        for entry in entries:
            if entry.image_id in self._recording:  # delivered; its record is on its way
                continue
            if self.storing.watch(entry.image_id):  # its object is on its way: read again once it is there
                continue
            if entry.image_id in self._settled:  # finished while the query ran
                newer = self._settled[entry.image_id]
                if newer is None:
                    continue
                entry = newer
            queues.setdefault((entry.priority_class, entry.device_id), []).append(entry)
        self.lanes.replace(queues, fetch)
        self._refilled_at = self.monotonic()
        if self._hold is not None and self._hold[1] <= generation:
            self._hold = None

    def _dispatch(self, tg: TaskGroup) -> None:
        now = self.clock()
        moment = self._moment(now)
        hold = float("-inf") if self._hold is None else self._hold[0]
        while self.gate.may_send(self.in_flight):
            entry = self.lanes.start_next(now, moment, hold)
            if entry is None:
                return
            tg.start_soon(self._forward, entry)

    def _has_due(self) -> bool:
        now = self.clock()
        return self.lanes.has_due(now, self._moment(now))

    # -- one upload ----------------------------------------------------------------------------

    async def _forward(self, entry: outbox.Entry) -> None:
        try:
            # Announced, so that the catalog writer may wait for this delivery to join a group.
            with self.catalog.expect() as record:
                outcome, cloud_answered = await self.sender.send(entry, self.bucket)
                await self._record(entry, outcome, cloud_answered, record)
        except Exception:
            # Most likely the catalog refused the result: hold the entry back a while in memory
            # (it is still pending on disk) rather than resend it in a tight loop.
            log.exception("forwarding %s failed unexpectedly", entry.image_id)
            entry.next_attempt_at = self.clock() + self.retry.delay_s(entry.attempts + 1)
            self._settle(entry, entry)
        finally:
            self.lanes.finished(entry.image_id)
            self._wake.set()

    async def _record(self, entry: outbox.Entry, outcome: Outcome, cloud_answered: bool, record: Expected) -> None:
        now = self.clock()
        self.metrics.forward_attempts.labels(outcome_label(outcome, cloud_answered)).inc()
        if outcome.kind == DELIVERED:
            # The cloud holds it: the device's next image may go while this delivery is recorded
            # (a crash before the record means one resend, which the cloud answers 409).
            self._recording.add(entry.image_id)
            self._settle(entry, None)
            self.lanes.finished(entry.image_id)
            if self._tg is not None:
                self._dispatch(self._tg)  # the device's next image now, not after the main loop's next turn
            self._wake.set()
            try:
                await record.write_records([OutboxDelivered(
                    image_id=entry.image_id, at=now, status=outcome.status, cloud_image_id=outcome.image_id,
                    cloud_batch_id=outcome.batch_id, cloud_storage_key=outcome.storage_key)])
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
                was = self.gate.state
                self.gate.on_retryable(outcome.status, outcome.retry_after_s, outcome.connection_failed)
                if self.gate.state == OFFLINE and was != OFFLINE:
                    self.offline_since = now
                    await connectivity.went_offline(self.catalog, self.client.base_url, outcome.error)
            attempts = entry.attempts + 1
            if self.retry.gives_up_after(attempts):
                reason = f"gave up after {attempts} attempts; last: {outcome.error}"
                await self.catalog.write(lambda c: outbox.mark_dead(c, [entry.image_id], now, outcome.status, reason,
                                                                    True))
                self._settle(entry, None)
                return
            delay = self.retry.delay_s(attempts)
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
            in_flight = self.lanes.in_flight
            doomed += [e.image_id for e in self.lanes.of_device(entry.device_id) if e.image_id != entry.image_id
                       and e.image_id not in in_flight]
            doomed += await self.catalog.read(lambda c: outbox.device_backlog(c, entry.device_id, outbox.PENDING))
            doomed = list(dict.fromkeys(i for i in doomed if i == entry.image_id or i not in in_flight))
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
        self.lanes.update(newer)

    def _settle_id(self, device_id: str, image_id: str) -> None:
        """The entry is done with (delivered or dead-lettered): out of the queues, its copy gone."""
        self._settled[image_id] = None
        if self.cache is not None:
            self.cache.drop(image_id)
        self.lanes.drop(device_id, image_id)

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
                self._hold_until_read(float("inf"))  # first (no await before): arrivals may outrank what is in hand
                since, self.offline_since = self.offline_since, None
                await connectivity.came_back(self.catalog, self.client.base_url,
                                             None if since is None else self.clock() - since)
        except Exception:
            log.exception("cloud probe failed unexpectedly")
            self.gate.on_probe(False)
        finally:
            self._probing = False
            self._wake.set()

    def _any_key(self) -> str | None:
        for device_id in self.lanes.device_ids():
            try:
                key = self.registry.key_of(device_id)
            except KeyUnreadable:
                continue
            if key is not None:
                return key
        return None
