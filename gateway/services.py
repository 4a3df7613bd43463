"""The composition root: every service of the gateway, built once in `build_services`.

Each service gets what it needs in its constructor; nothing is assigned later. Where one part
must tell another, the dependency runs one way and is visible here:
- an entry reached DuckDB, a held upload was released, an admin retried one -> `outbox_changed`
  (a `Signal` the forwarder listens to);
- a batch sealed by count, by hand or once the reconciliation settles a leftover row -> `batch_sealed`:
  its manifest is queued, the sealer woken;
- a batch turned forwarded -> its manifest is rewritten with the cloud's ids;
- bytes delivered -> the status page's throughput; each forwarder round -> quarantine re-checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.batches.lifecycle import BatchSealer
from gateway.batches.manifests import ManifestWriter
from gateway.catalog import Catalog
from gateway.catalog.collecting import CollectingBatches
from gateway.config import Settings
from gateway.devices.keycheck import RECHECK_EVERY_S, KeyChecker
from gateway.devices.keysecret import KeySecret
from gateway.devices.provisioning import Provisioner
from gateway.devices.registry import DeviceRegistry
from gateway.devices.tokens import TokenStore
from gateway.forward.backoff import CloudGate
from gateway.forward.cache import ForwardCache
from gateway.forward.checkins import CheckinRelay
from gateway.forward.classes import UplinkPlan
from gateway.forward.client import CloudClient
from gateway.forward.retention import RetentionSweeper
from gateway.forward.worker import Forwarder
from gateway.ingest.admission import Admission
from gateway.ingest.capacity import CapacityGuard
from gateway.ingest.pipeline import Ingestor
from gateway.ingest.reconcile import Reconciler
from gateway.ingest.storing import StoringImages
from gateway.notify import Signal
from gateway.ops.activity import RecentErrors, Throughput
from gateway.ops.health import Health
from gateway.ops.metrics import Metrics
from gateway.ops.verify import VerifyProgress
from gateway.outbound import Outbound
from gateway.storage import ObjectStore, open_store
from gateway.storage.probe import StoreProbe
from gateway.system.cpuidle import IdleCpu
from gateway.system.ratelimit import DeviceRateLimiter


def catalog_path(settings: Settings) -> Path:
    return settings.data_dir / "catalog.duckdb"


@dataclass(frozen=True, kw_only=True)
class Services:
    """Every service of one gateway; the HTTP routes get them by name (see `gateway.app`)."""

    settings: Settings
    clock: Callable[[], float]
    http: Outbound  # the one outbound HTTP client (cloud and S3 store alike)
    metrics: Metrics
    throughput: Throughput  # per-minute accepted/delivered, for the status page
    recent_errors: RecentErrors  # last error responses (app.py's access middleware)
    outbox_changed: Signal  # the outbox has new work: the forwarder looks again
    catalog: Catalog
    store: ObjectStore
    store_probe: StoreProbe
    key_secret: KeySecret
    registry: DeviceRegistry
    tokens: TokenStore
    collecting: CollectingBatches  # each device's open batch; the catalog writer owns it
    uplink: UplinkPlan  # priority classes and sending windows (forward.classes, forward.windows)
    manifests: ManifestWriter
    sealer: BatchSealer
    batch_sealed: Callable[[str], None]  # a batch sealed by count, by hand or by a settled leftover row
    forward_cache: ForwardCache | None  # object stores with forwarding on (forward.cache_bytes)
    capacity: CapacityGuard
    ingestor: Ingestor
    reconciler: Reconciler
    cloud: CloudClient | None  # forwarding on (cloud.url)
    forwarder: Forwarder | None  # forwarding on
    retention: RetentionSweeper | None  # forwarding on and forward.delete_after_days
    keycheck: KeyChecker
    checkins: CheckinRelay
    provisioner: Provisioner
    admission: Admission
    health: Health
    verify_progress: VerifyProgress  # the running `gateway verify` (admin API), one at a time

    @property
    def forwarding_on(self) -> bool:
        return bool(self.settings.cloud.url)


def build_services(settings: Settings, clock: Callable[[], float], http: Outbound) -> Services:
    """Build every service, in dependency order; opening files and connections waits for `Gateway.start`."""
    s = settings
    forwarding_on = bool(s.cloud.url)
    started_at = clock()
    metrics, throughput = Metrics(), Throughput(clock)
    outbox_changed = Signal("outbox changed")
    # New outbox entries are visible to the forwarder once the catalog has moved its journal into DuckDB.
    catalog = Catalog(catalog_path(s), s.data.catalog_threads,
                      on_applied=outbox_changed.fire if forwarding_on else None)
    metrics.watch_catalog(lambda: (catalog.commits, catalog.ops))
    store = open_store(s, http)
    key_secret = KeySecret(catalog, s.keys.secret_file)
    registry = DeviceRegistry(catalog, key_secret, s.cloud.organization_id, clock)
    tokens = TokenStore(catalog, clock)

    cache: ForwardCache | None = None
    if forwarding_on and s.forward.cache_bytes and store.name != "folder":
        cache = ForwardCache(s.data_dir / "forward-cache", s.forward.cache_bytes,
                             disk_floor=2 * s.limits.min_free_disk_bytes)
        metrics.watch_forward_cache(lambda: (cache.size, cache.count, cache.hits, cache.misses))
    capacity = CapacityGuard(catalog, s.data_dir, s.limits.max_pending_bytes, s.limits.min_free_disk_bytes, metrics,
                             store=store, prefer_drained=bool(s.sync.token), forward_cache=cache)

    manifests = ManifestWriter(catalog, store, s.data_dir, metrics, clock)

    def cloud_ids_arrived(batch_ids: list[str]) -> None:
        # Manifests list the cloud's ids. A batch's manifest is rewritten once all its images are
        # delivered (here, when it turns `forwarded`), not after every delivery: each rewrite is a
        # Parquet COPY and a PUT. The manifest writer's periodic scan catches partial progress.
        for batch_id in batch_ids:
            manifests.request(batch_id)

    collecting = catalog.collecting
    uplink = UplinkPlan.from_settings(s.forward)
    sealer = BatchSealer(catalog, collecting, s.batches.timeout_s, forwarding_on, clock,
                         on_sealed=manifests.sealed_many, on_forwarded=cloud_ids_arrived)

    def batch_sealed(batch_id: str) -> None:
        """Sealed by count, by hand or by a settled leftover row: its manifest is due, and the sealer
        moves it on now."""
        manifests.sealed(batch_id)
        sealer.wake()

    # Images recorded while their objects are being stored (or left so by a crash): not forwarded yet.
    storing = StoringImages(settled=outbox_changed if forwarding_on else None)
    ingestor = Ingestor(s, catalog, store, metrics, clock, uplink, forward_cache=cache, on_sealed=batch_sealed,
                        idle_cpu=IdleCpu(), storing=storing)
    reconciler = Reconciler(catalog, store, ingestor.spool_dir, lambda: ingestor.active_intents, started_at,
                            storing=storing, on_sealed=batch_sealed)

    cloud = CloudClient(http, s.cloud.url, s.cloud.timeout_s, s.cloud.deadline_s, s.cloud.proxy) if forwarding_on \
        else None
    gate = CloudGate(s.forward.concurrency, s.forward.backoff_base_s, s.forward.backoff_max_s, clock=time.monotonic)
    keycheck = KeyChecker(registry, catalog, s.cloud, cloud,
                          cloud_reachable=lambda: cloud is None or gate.reachable,
                          # quarantined keys are re-asked about as often as retries are spaced
                          recheck_every_s=min(RECHECK_EVERY_S, s.forward.backoff_max_s),
                          lookups=DeviceRateLimiter(
                              s.limits.unknown_key_checks_per_minute, clock, what="unknown-key checks",
                              message="Too many unknown device keys to check with the cloud; retry later"),
                          max_quarantined=s.limits.max_quarantined_devices,
                          on_released=outbox_changed.fire)
    forwarder: Forwarder | None = None
    retention: RetentionSweeper | None = None
    if cloud is not None:
        forwarder = Forwarder(s, catalog, store, registry, metrics, cloud, clock, cache=cache, gate=gate, uplink=uplink,
                              wake=outbox_changed, on_delivered_bytes=throughput.record_delivered,
                              on_round=keycheck.maybe_recheck, storing=storing)
        if s.forward.delete_after_days > 0:
            retention = RetentionSweeper(catalog, store, metrics, s.forward.delete_after_days, bool(s.sync.token),
                                         clock)
    provisioner = Provisioner(
        s, registry, tokens, cloud,
        DeviceRateLimiter(s.provisioning.requests_per_minute_per_client, clock, what="provisioning requests",
                          message="Too many provisioning requests from this address"),
    )
    store_probe = StoreProbe(store)
    admission = Admission(s, keycheck, DeviceRateLimiter(s.limits.uploads_per_minute_per_device, clock), capacity,
                          store_probe, ingestor, registry, throughput, metrics, clock)
    health = Health(s, catalog, store_probe, forwarder, reconciler, throughput, metrics, clock, started_at, uplink)
    return Services(
        settings=s, clock=clock, http=http, metrics=metrics, throughput=throughput, recent_errors=RecentErrors(),
        outbox_changed=outbox_changed, catalog=catalog, store=store, store_probe=store_probe, key_secret=key_secret,
        registry=registry, tokens=tokens, collecting=collecting, uplink=uplink, manifests=manifests, sealer=sealer,
        batch_sealed=batch_sealed, forward_cache=cache, capacity=capacity, ingestor=ingestor, reconciler=reconciler,
        cloud=cloud, forwarder=forwarder, retention=retention, keycheck=keycheck, checkins=CheckinRelay(forwarder),
        provisioner=provisioner, admission=admission, health=health, verify_progress=VerifyProgress(),
    )

