"""`Health`: readiness (`/api/ready`), the status report and the gauges refreshed from it.

Readiness turns 503 the moment shutdown starts (`stop_accepting`), while the catalog takes no
write, or while the object store does not answer.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from typing import Any

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.forward.classes import UplinkPlan
from gateway.forward.outbox import class_backlog
from gateway.forward.worker import Forwarder
from gateway.ingest.reconcile import Reconciler
from gateway.ops.activity import Throughput
from gateway.ops.metrics import CONNECTIVITY_STATES, Metrics
from gateway.ops.status import StatusReport, read_status
from gateway.storage.probe import StoreProbe


class Health:
    """What the ops routes and the status page report about the running gateway."""

    def __init__(self, settings: Settings, catalog: Catalog, store_probe: StoreProbe, forwarder: Forwarder | None,
                 reconciler: Reconciler, throughput: Throughput, metrics: Metrics, clock: Callable[[], float],
                 started_at: float, uplink: UplinkPlan) -> None:
        """`forwarder`: None while forwarding is off (no cloud.url); `uplink`: classes and windows."""
        self.settings = settings
        self.catalog = catalog
        self.store_probe = store_probe
        self.forwarder = forwarder
        self.reconciler = reconciler
        self.throughput = throughput
        self.metrics = metrics
        self.clock = clock
        self.started_at = started_at
        self.uplink = uplink
        self._stopping = False

    @property
    def forwarding_on(self) -> bool:
        return bool(self.settings.cloud.url)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_accepting(self) -> None:
        """Shutdown has begun: readiness answers 503 from now on."""
        self._stopping = True

    def uptime_s(self) -> float:
        return self.clock() - self.started_at

    async def readiness(self) -> dict[str, Any]:
        """What /api/ready reports; raises `ServiceUnavailable` when not ready."""
        checks: dict[str, str] = {}
        if self._stopping:
            raise ServiceUnavailable("Shutting down", retry_after=5)
        try:
            await self.catalog.read(lambda c: c.execute("SELECT 1").fetchone())
            # Uploads are refused while the journal takes no write (a full disk): so is readiness.
            await asyncio.wrap_future(self.catalog.probe_write())
            checks["catalog"] = "ok"
        except GatewayError as exc:
            raise ServiceUnavailable("Catalog not ready", f"{exc.message}: {exc.details}") from exc
        try:
            await self.store_probe.require()
            checks["object_store"] = "ok"
        except GatewayError as exc:
            raise ServiceUnavailable("Object store not ready", exc.details) from exc
        return checks

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
        fwd = self.forwarder
        report.connectivity = "off" if not self.forwarding_on else fwd.connectivity if fwd else "unknown"
        if fwd is not None and fwd.last_error_at is not None and (
                report.last_error_at is None or fwd.last_error_at >= report.last_error_at):
            report.last_error, report.last_error_at = fwd.last_error, fwd.last_error_at  # fresher than the catalog's
        report.eta_s = self.throughput.eta_s(report.backlog_count, report.backlog_bytes)
        if report.connectivity == "offline":
            report.eta_s = None  # past throughput says nothing while the cloud cannot be reached
        startup = self.reconciler.startup
        report.startup = {
            "reconciled_intents": startup.intents,
            "committed": startup.committed,
            "strays_removed": len(startup.strays_removed),
            "withdrawn": len(startup.withdrawn),
            "missing_objects": startup.missing_objects,
            "deferred": startup.deferred,
            "unsettled_intents": self.reconciler.unsettled,
            "clean": startup.clean,
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
        m.disk_free.set(report.disk_free_bytes or 0)
        m.catalog_bytes.set(report.catalog_bytes)
        m.set_class_backlog(report.uplink.get("classes", []))
        return report
