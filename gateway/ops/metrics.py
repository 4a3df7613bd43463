"""Prometheus metrics: one registry per app (tests run several apps in one process).

Counters are incremented where things happen; gauges that describe catalog state (backlog,
oldest pending age, disk) are computed when `/metrics` is scraped, through `Gauges.refresh`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "acusight_gateway"
# gateway.forward.worker's attempt outcomes and gateway.forward.backoff's states.
FORWARD_OUTCOMES = ("delivered", "already_delivered", "retry", "connection_error", "rejected", "local_error")
CONNECTIVITY_STATES = ("online", "degraded", "offline", "recovering")


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double every counter's lines for no use here
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.uploads = Counter(f"{PREFIX}_uploads", "Upload requests by outcome (error code or 'accepted').",
                               ["outcome"], registry=r)
        self.uploads_by_device = Counter(f"{PREFIX}_device_uploads", "Accepted uploads by device.",
                                         ["device_id"], registry=r)
        self.upload_bytes = Counter(f"{PREFIX}_upload_bytes", "Image bytes accepted.", registry=r)
        self.dedup_hits = Counter(f"{PREFIX}_dedup_hits", "Uploads whose bytes were already stored.", registry=r)
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds", "HTTP request latency.", ["route", "status"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.forward_attempts = Counter(f"{PREFIX}_forward_attempts", "Forward attempts by outcome.",
                                        ["outcome"], registry=r)
        self.forward_bytes = Counter(f"{PREFIX}_forward_bytes", "Image bytes delivered to the cloud.", registry=r)
        self.evictions = Counter(f"{PREFIX}_evicted_bytes", "Local bytes of delivered images removed.", registry=r)
        self.pressure_evictions = Counter(f"{PREFIX}_disk_pressure_evictions",
                                          "Delivered images whose local bytes were removed to make room on a "
                                          "nearly full disk (their bytes count in evicted_bytes).", registry=r)
        self.storage_refusals = Counter(f"{PREFIX}_storage_refusals", "Uploads refused for lack of room, by reason.",
                                        ["reason"], registry=r)
        self.batches_sealed = Counter(f"{PREFIX}_batches_sealed", "Batches sealed.", registry=r)
        self.manifest_writes = Counter(f"{PREFIX}_manifest_writes", "Batch manifests written, by outcome.",
                                       ["outcome"], registry=r)
        self.sync_acks = Counter(f"{PREFIX}_sync_acks",
                                 "Batch acks from sync jobs, by outcome (drained, already_drained, refused).",
                                 ["outcome"], registry=r)
        self.sync_image_bytes = Counter(f"{PREFIX}_sync_image_bytes", "Image bytes served to sync jobs.",
                                        registry=r)
        self.near_duplicates = Counter(f"{PREFIX}_near_duplicates",
                                       "Frames found nearly equal to a recent frame of their device, by device and "
                                       "action taken (keep, hold, reject).", ["device_id", "action"], registry=r)
        self.near_duplicate_bytes_not_sent = Counter(f"{PREFIX}_near_duplicate_bytes_not_sent",
                                                     "Image bytes of near-duplicates held or rejected: uplink saved.",
                                                     registry=r)
        self.fingerprints = Counter(f"{PREFIX}_fingerprints",
                                    "Frames fingerprinted, by result (done, undecodable; stored unchecked: "
                                    "no_idle_cpu, busy).",
                                    ["result"], registry=r)
        self.fingerprint_cpu_seconds = Counter(f"{PREFIX}_fingerprint_cpu_seconds",
                                               "CPU time spent fingerprinting and comparing frames.", registry=r)
        # State gauges, refreshed on scrape.
        self.backlog_count = Gauge(f"{PREFIX}_backlog_images", "Images not yet delivered to the cloud.", registry=r)
        self.backlog_bytes = Gauge(f"{PREFIX}_backlog_bytes", "Bytes not yet delivered to the cloud.", registry=r)
        self.oldest_pending_age = Gauge(f"{PREFIX}_oldest_pending_age_seconds",
                                        "Age of the oldest undelivered image.", registry=r)
        self.dead_letters = Gauge(f"{PREFIX}_dead_letters", "Outbox entries dead-lettered.", registry=r)
        self.dead_key_unreadable = Gauge(f"{PREFIX}_dead_letters_key_unreadable",
                                         "Dead letters whose device key does not open under the key secret.",
                                         registry=r)
        self.journal_quarantined = Gauge(f"{PREFIX}_journal_quarantined",
                                         "Catalog journal records DuckDB refused, set aside for "
                                         "`gateway journal quarantine`.", registry=r)
        self.cloud_up = Gauge(f"{PREFIX}_cloud_connected", "1 while the cloud answers, else 0.", registry=r)
        self.last_forward_success = Gauge(f"{PREFIX}_last_forward_success_timestamp_seconds",
                                          "Unix time of the last delivery.", registry=r)
        self.disk_free = Gauge(f"{PREFIX}_disk_free_bytes", "Free bytes on the data folder's disk.", registry=r)
        self.catalog_bytes = Gauge(f"{PREFIX}_catalog_bytes", "Size of the catalog file.", registry=r)
        self.images_stored = Gauge(f"{PREFIX}_images", "Images in the catalog.", registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 while /api/ready answers 200.", registry=r)
        self.cloud_connectivity = Gauge(f"{PREFIX}_cloud_connectivity",
                                        "1 for the forwarder's connectivity state (online, degraded, offline, "
                                        "recovering), 0 for the others.", ["state"], registry=r)
        self.forward_in_flight = Gauge(f"{PREFIX}_forward_in_flight", "Uploads to the cloud in flight.", registry=r)
        self.class_backlog_count = Gauge(f"{PREFIX}_class_backlog_images",
                                         "Images not yet delivered, by priority class.", ["class"], registry=r)
        self.class_backlog_bytes = Gauge(f"{PREFIX}_class_backlog_bytes",
                                         "Bytes not yet delivered, by priority class.", ["class"], registry=r)
        self.class_oldest_age = Gauge(f"{PREFIX}_class_oldest_pending_age_seconds",
                                      "Age of the oldest undelivered image, by priority class (0: none).",
                                      ["class"], registry=r)
        self.forwarding_enabled = Gauge(f"{PREFIX}_forwarding_enabled",
                                        "1 when a cloud URL is set (alerts on connectivity need it).", registry=r)
        # Known label values start at 0, so rate() and alert rules see a series before the first event.
        for outcome in FORWARD_OUTCOMES:
            self.forward_attempts.labels(outcome)
        for state in CONNECTIVITY_STATES:
            self.cloud_connectivity.labels(state)
        for reason in ("disk_floor", "pending_bytes"):  # capacity.CapacityGuard's refusals
            self.storage_refusals.labels(reason)
        self.uploads.labels("accepted")
        for result in ("done", "undecodable", "busy"):
            self.fingerprints.labels(result)

    def watch_catalog(self, figures: Callable[[], tuple[int, int]]) -> None:
        """Export the catalog writer's committed transactions and writes, read at scrape time:
        their ratio is the group-commit size (`figures` gives (transactions, writes))."""
        def collect() -> Iterator[Metric]:
            transactions, writes = figures()
            yield CounterMetricFamily(f"{PREFIX}_catalog_transactions", "Catalog transactions committed.",
                                      value=transactions)
            yield CounterMetricFamily(f"{PREFIX}_catalog_writes",
                                      "Catalog writes committed (uploads, deliveries, admin changes); divided by "
                                      "transactions, the group-commit size.", value=writes)

        self.registry.register(_Scraped(collect))

    def watch_forward_cache(self, figures: Callable[[], tuple[int, int, int, int]]) -> None:
        """Export the forward cache's size and use, read at scrape time (`figures` gives
        (bytes, images, hits, misses))."""
        def collect() -> Iterator[Metric]:
            size, images, hits, misses = figures()
            yield GaugeMetricFamily(f"{PREFIX}_forward_cache_bytes",
                                    "Bytes of pending images kept in the forward cache.", value=size)
            yield GaugeMetricFamily(f"{PREFIX}_forward_cache_images", "Pending images kept in the forward cache.",
                                    value=images)
            yield CounterMetricFamily(f"{PREFIX}_forward_cache_hits",
                                      "Forward attempts that sent a cached copy, not read from the store.", value=hits)
            yield CounterMetricFamily(f"{PREFIX}_forward_cache_misses",
                                      "Forward attempts that read the image from the store.", value=misses)

        self.registry.register(_Scraped(collect))

    def set_class_backlog(self, classes: list[dict[str, Any]]) -> None:
        """Per-class backlog gauges from `UplinkPlan.report` rows (classes gone from both the
        configuration and the backlog lose their series)."""
        for gauge in (self.class_backlog_count, self.class_backlog_bytes, self.class_oldest_age):
            gauge.clear()
        for c in classes:
            self.class_backlog_count.labels(c["name"]).set(c["pending_count"])
            self.class_backlog_bytes.labels(c["name"]).set(c["pending_bytes"])
            self.class_oldest_age.labels(c["name"]).set(c["oldest_pending_age_s"] or 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Scraped(Collector):
    """Metrics computed when /metrics is scraped, by `collect`."""

    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()
