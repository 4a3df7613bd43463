"""The running gateway's parts and their start-up and shut-down order.

Start: data folders -> catalog (migrations) -> key secret -> devices, provisioning tokens -> object
store -> settle leftover upload intents -> ingest; then background loops (batch sealer, manifest writer,
reconciliation, forwarder).
Stop: refuse new work (readiness off) -> background loops cancelled -> catalog drained and closed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from gateway.batches.lifecycle import BatchSealer
from gateway.batches.manifests import ManifestWriter
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.devices.keycheck import RECHECK_EVERY_S, KeyChecker
from gateway.devices.keysecret import open_keybox
from gateway.devices.provisioning import Provisioner
from gateway.devices.registry import DeviceRegistry
from gateway.devices.tokens import TokenStore
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.forward.cache import ForwardCache
from gateway.forward.classes import UplinkPlan
from gateway.forward.client import CloudClient
from gateway.forward.outbox import class_backlog
from gateway.forward.retention import RetentionSweeper
from gateway.forward.worker import Forwarder
from gateway.ingest.capacity import CapacityGuard
from gateway.ingest.pipeline import Ingestor
from gateway.ingest.reconcile import ReconcileReport, check_recent_objects, settle_intents
from gateway.ops.activity import RecentErrors, Throughput
from gateway.ops.metrics import CONNECTIVITY_STATES, Metrics
from gateway.ops.status import StatusReport, read_status
from gateway.outbound import Outbound
from gateway.storage import ObjectStore, open_store
from gateway.system.ratelimit import DeviceRateLimiter

log = logging.getLogger("gateway")
RECONCILE_EVERY_S = 600.0
RECONCILE_RETRY_S = 5.0
# After a crash, how long a PUT the dead process had sent may take to land in the store.
INTENT_QUIET_S = 20.0
STALE_INTENT_S = 600.0


def catalog_path(settings: Settings) -> Path:
    return settings.data_dir / "catalog.duckdb"


class Gateway:
    """Everything a running server holds; `create_app` wires it to HTTP."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time,
                 http: Outbound | None = None) -> None:
        self.settings = settings
        self.clock = clock
        # The one outbound HTTP client (cloud and S3 store alike); its session lives from
        # `start` to `stop`, in the lifespan.
        self.http = http or Outbound()
        self.metrics = Metrics()
        self.throughput = Throughput(clock)  # per-minute accepted/delivered, for the status page
        self.recent_errors = RecentErrors()  # last error responses (app.py's access middleware)
        self.catalog = Catalog(catalog_path(settings), settings.data.catalog_threads)
        self.metrics.watch_catalog(lambda: (self.catalog.commits, self.catalog.ops))
        self.store: ObjectStore = open_store(settings, self.http)
        self.rate_limiter = DeviceRateLimiter(settings.limits.uploads_per_minute_per_device, clock)
        self.capacity = CapacityGuard(
            self.catalog, settings.data_dir, settings.limits.max_pending_bytes, settings.limits.min_free_disk_bytes,
            self.metrics, store=self.store, prefer_drained=bool(settings.sync.token),
        )
        self.manifests = ManifestWriter(self.catalog, self.store, settings.data_dir, self.metrics, clock)
        self.uplink = UplinkPlan.from_settings(settings.forward)  # priority classes and sending windows
        self.registry: DeviceRegistry
        self.ingestor: Ingestor
        self.sealer: BatchSealer
        self.keycheck: KeyChecker
        self.tokens: TokenStore
        self.provisioner: Provisioner
        self.cloud: CloudClient | None = None  # set while forwarding is on (cloud.url)
        self.forwarder: Forwarder | None = None
        self.forward_cache: ForwardCache | None = None  # object stores with forwarding on (forward.cache_bytes)
        self.retention: RetentionSweeper | None = None
        self.shutting_down = False
        self.started_at = clock()
        self.startup_report = ReconcileReport()
        self.unsettled_intents = 0  # leftover upload intents still to settle (see _reconcile_loop)
        self._store_ok_at = 0.0
        self._store_check = asyncio.Lock()

    @property
    def forwarding_on(self) -> bool:
        return bool(self.settings.cloud.url)

    async def open_catalog(self) -> None:
        """Catalog and devices only: what the CLI needs to work on a stopped server's files."""
        s = self.settings
        s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # catalog, spool, objects: owner only
        await anyio.to_thread.run_sync(self.catalog.open)
        keybox = await open_keybox(self.catalog, s.keys.secret_file)
        self.registry = DeviceRegistry(self.catalog, keybox, s.cloud.organization_id, self.clock)
        await self.registry.load()
        self.tokens = TokenStore(self.catalog, self.clock)

    async def start(self) -> None:
        s = self.settings
        await self.open_catalog()  # first: a locked catalog ends the start before any session opens
        await self.http.start()
        self.ingestor = Ingestor(s, self.catalog, self.store, self.metrics, self.clock, self.uplink)
        if self.forwarding_on and s.forward.cache_bytes and self.store.name != "folder":
            self.forward_cache = ForwardCache(s.data_dir / "forward-cache", s.forward.cache_bytes,
                                              disk_floor=2 * s.limits.min_free_disk_bytes)
            await anyio.to_thread.run_sync(self.forward_cache.open)
            self.ingestor.forward_cache = self.capacity.forward_cache = cache = self.forward_cache
            self.metrics.watch_forward_cache(lambda: (cache.size, cache.count, cache.hits, cache.misses))
        await self.ingestor.start()
        self.sealer = BatchSealer(self.catalog, self.catalog.collecting, s.batches.timeout_s, self.forwarding_on,
                                  self.clock,
                                  on_sealed=self.manifests.sealed_many, on_forwarded=self._cloud_ids_arrived)
        self.ingestor.on_sealed = self.batch_sealed
        self._wire_forwarding()
        self.provisioner = Provisioner(
            s, self.registry, self.tokens, self.cloud,
            DeviceRateLimiter(s.provisioning.requests_per_minute_per_client, self.clock, what="provisioning requests",
                              message="Too many provisioning requests from this address"),
        )
        try:
            await anyio.to_thread.run_sync(self.store.ensure_ready)
            self._store_ok_at = time.monotonic()
            self.startup_report = await anyio.to_thread.run_sync(self._reconcile_at_start)
        except GatewayError as exc:
            log.error("object store not ready at start-up (%s); uploads get 503 until it answers", exc)
            # Leftover upload intents wait for the store; the reconcile loop retries them soon.
            self.startup_report = ReconcileReport(deferred=len(list(self.ingestor.spool_dir.glob("*.part"))))

    def batch_sealed(self, batch_id: str) -> None:
        """A batch was sealed by count or by hand: its manifest is due, and the sealer moves it on."""
        self.manifests.sealed(batch_id)
        sealer: BatchSealer | None = getattr(self, "sealer", None)  # absent on the CLI's offline use
        if sealer is not None:
            sealer.wake()

    def _wire_forwarding(self) -> None:
        """Cloud client, forwarder, key checker and retention (only the key checker without cloud.url)."""
        s = self.settings
        if self.forwarding_on:
            self.cloud = CloudClient(self.http, s.cloud.url, s.cloud.timeout_s, s.cloud.deadline_s, s.cloud.proxy)
            fwd = self.forwarder = Forwarder(s, self.catalog, self.store, self.registry, self.metrics, self.cloud,
                                             self.clock, cache=self.forward_cache, uplink=self.uplink)
            fwd.on_delivered_bytes = self.throughput.record_delivered
            # New outbox entries are visible once the catalog has moved its journal into DuckDB.
            loop = asyncio.get_running_loop()

            def applied() -> None:  # in the catalog writer thread
                if not loop.is_closed():
                    loop.call_soon_threadsafe(fwd.notify)

            self.catalog.on_applied = applied
            if s.forward.delete_after_days > 0:
                self.retention = RetentionSweeper(self.catalog, self.store, self.metrics, s.forward.delete_after_days,
                                                  bool(s.sync.token), self.clock)
        self.keycheck = KeyChecker(self.registry, self.catalog, s.cloud, self.cloud,
                                   cloud_reachable=lambda: self.forwarder is None or self.forwarder.gate.reachable,
                                   # quarantined keys are re-asked about as often as retries are spaced
                                   recheck_every_s=min(RECHECK_EVERY_S, s.forward.backoff_max_s),
                                   lookups=DeviceRateLimiter(
                                       s.limits.unknown_key_checks_per_minute, self.clock, what="unknown-key checks",
                                       message="Too many unknown device keys to check with the cloud; retry later"),
                                   max_quarantined=s.limits.max_quarantined_devices)
        if self.forwarder is not None:
            self.keycheck.on_released = self.forwarder.notify
            self.forwarder.on_round = self.keycheck.maybe_recheck

    def _cloud_ids_arrived(self, batch_ids: list[str]) -> None:
        # Manifests list the cloud's ids. A batch's manifest is rewritten once all its images are
        # delivered (here, when it turns `forwarded`), not after every delivery: each rewrite is a
        # Parquet COPY and a PUT. The manifest writer's periodic scan catches partial progress.
        for batch_id in batch_ids:
            self.manifests.request(batch_id)

    def _reconcile_at_start(self) -> ReconcileReport:
        report = settle_intents(self.catalog, self.store, self.ingestor.spool_dir,
                                quiet_until=self.started_at + INTENT_QUIET_S)
        check_recent_objects(self.catalog, self.store, report=report)
        if report.intents:
            log.info("start-up reconciliation: %d leftover upload(s), %d committed, %d stray object(s) removed",
                     report.intents, report.committed, len(report.strays_removed))
        return report

    def run_background(self, tg: TaskGroup) -> None:
        tg.start_soon(self.ingestor.keep_seen_keys)
        tg.start_soon(self.sealer.run)
        tg.start_soon(self.manifests.run)
        tg.start_soon(self._reconcile_loop)
        if self.forwarder is not None:
            tg.start_soon(self.forwarder.run)
        if self.retention is not None:
            tg.start_soon(self.retention.run)

    async def _reconcile_loop(self) -> None:
        # Intents a previous process left are retried soon while any remain unsettled (the store
        # was down at start-up); this process's own are settled once clearly abandoned.
        self.unsettled_intents = self.startup_report.deferred
        while True:
            await anyio.sleep(RECONCILE_RETRY_S if self.unsettled_intents else RECONCILE_EVERY_S)
            try:
                report = await anyio.to_thread.run_sync(lambda: settle_intents(
                    self.catalog, self.store, self.ingestor.spool_dir,
                    skip=self.ingestor.active_intents, min_age_s=STALE_INTENT_S, before=self.started_at,
                    quiet_until=self.started_at + INTENT_QUIET_S))
                self.unsettled_intents = report.deferred
            except Exception as exc:
                log.warning("periodic reconciliation failed: %s", exc)
                self.unsettled_intents = max(1, self.unsettled_intents)

    async def stop(self) -> None:
        self.shutting_down = True
        if self.forward_cache is not None:
            await anyio.to_thread.run_sync(self.forward_cache.close)
        await anyio.to_thread.run_sync(self.catalog.close)
        self.store.close()
        await self.http.aclose()

    # -- health ----------------------------------------------------------------------------

    async def readiness(self) -> dict[str, Any]:
        """What /api/ready reports; raises `ServiceUnavailable` when not ready."""
        checks: dict[str, str] = {}
        if self.shutting_down:
            raise ServiceUnavailable("Shutting down", retry_after=5)
        try:
            await self.catalog.read(lambda c: c.execute("SELECT 1").fetchone())
            # Uploads are refused while the journal takes no write (a full disk): so is readiness.
            await asyncio.wrap_future(self.catalog.probe_write())
            checks["catalog"] = "ok"
        except GatewayError as exc:
            raise ServiceUnavailable("Catalog not ready", f"{exc.message}: {exc.details}") from exc
        try:
            await self.require_store()
            checks["object_store"] = "ok"
        except GatewayError as exc:
            raise ServiceUnavailable("Object store not ready", exc.details) from exc
        return checks

    async def require_store(self) -> None:
        """Fail fast with 503 while the object store is known to be down (re-checked each second)."""
        if time.monotonic() - self._store_ok_at < 1.0:
            return
        async with self._store_check:  # one probe at a time: concurrent uploads share its answer
            if time.monotonic() - self._store_ok_at < 1.0:
                return
            try:
                await anyio.to_thread.run_sync(self.store.ensure_ready)
            except GatewayError:
                self._store_ok_at = 0.0
                raise
            self._store_ok_at = time.monotonic()

    def disk_free(self) -> int | None:
        try:
            return shutil.disk_usage(self.settings.data_dir).free
        except OSError:
            return None

    async def status(self) -> StatusReport:
        now = self.clock()
        report, by_class = await self.catalog.read(lambda c: (read_status(c, now), class_backlog(c)))
        report.uplink = self.uplink.report(by_class, now)
        report.disk_free_bytes = self.disk_free()
        report.catalog_bytes = self.catalog.file_bytes()
        report.journal_quarantined = self.catalog.quarantine.count
        report.connectivity = (
            "off" if not self.forwarding_on else self.forwarder.connectivity if self.forwarder else "unknown"
        )
        fwd = self.forwarder
        if fwd is not None and fwd.last_error_at is not None and (
                report.last_error_at is None or fwd.last_error_at >= report.last_error_at):
            report.last_error, report.last_error_at = fwd.last_error, fwd.last_error_at  # fresher than the catalog's
        report.eta_s = self.throughput.eta_s(report.backlog_count, report.backlog_bytes)
        if report.connectivity == "offline":
            report.eta_s = None  # past throughput says nothing while the cloud cannot be reached
        report.startup = {
            "reconciled_intents": self.startup_report.intents,
            "committed": self.startup_report.committed,
            "strays_removed": len(self.startup_report.strays_removed),
            "missing_objects": self.startup_report.missing_objects,
            "deferred": self.startup_report.deferred,
            "unsettled_intents": self.unsettled_intents,
            "clean": self.startup_report.clean,
        }
        return report

    async def refresh_gauges(self) -> StatusReport:
        report = await self.status()
        m = self.metrics
        m.images_stored.set(report.images)
        m.backlog_count.set(report.backlog_count)
        m.backlog_bytes.set(report.backlog_bytes)
        m.oldest_pending_age.set(report.oldest_pending_age_s or 0.0)
        m.dead_letters.set(report.dead_count)
        m.dead_key_unreadable.set(report.key_unreadable_count)
        m.journal_quarantined.set(report.journal_quarantined)
        m.last_forward_success.set(report.last_success_at or 0.0)
        # Degraded (some retries) and recovering (ramping up) still reach the cloud.
        m.cloud_up.set(1 if report.connectivity in ("online", "degraded", "recovering") else 0)
        m.forwarding_enabled.set(1 if self.forwarding_on else 0)
        if self.forwarder is not None:
            for state in CONNECTIVITY_STATES:
                m.cloud_connectivity.labels(state).set(1 if state == report.connectivity else 0)
            m.forward_in_flight.set(self.forwarder.in_flight)
        m.set_class_backlog(report.uplink.get("classes", []))
        m.disk_free.set(report.disk_free_bytes or 0)
        m.catalog_bytes.set(report.catalog_bytes)
        return report
