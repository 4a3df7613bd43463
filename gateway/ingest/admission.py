"""`Admission`: one device upload from its key to an acknowledged image, checks in the contract's order.

Order: device key (401/403) -> the device's rate limit (429) -> declared size (413) -> room on
disk and in the backlog (507) -> object store up (503) -> the upload pipeline. Every outcome is
counted in `gateway_uploads_total`. The HTTP side (reading, draining, closing) stays in `api/`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from gateway.config import Settings
from gateway.devices.keycheck import KeyChecker
from gateway.devices.registry import DeviceRegistry
from gateway.errors import GatewayError
from gateway.ingest.capacity import CapacityGuard
from gateway.ingest.form import image_too_large
from gateway.ingest.pipeline import Ingestor, UploadResult
from gateway.ops.activity import Throughput
from gateway.ops.metrics import Metrics
from gateway.storage.probe import StoreProbe
from gateway.system.ratelimit import DeviceRateLimiter

FORM_OVERHEAD = 256 * 1024  # multipart headers and boundaries, on top of the image and its metadata


class Admission:
    """Decides whether an upload may come in, then hands it to the `Ingestor` and counts it."""

    def __init__(self, settings: Settings, keycheck: KeyChecker, rate_limiter: DeviceRateLimiter,
                 capacity: CapacityGuard, store_probe: StoreProbe, ingestor: Ingestor, registry: DeviceRegistry,
                 throughput: Throughput, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.keycheck = keycheck
        self.rate_limiter = rate_limiter
        self.capacity = capacity
        self.store_probe = store_probe
        self.ingestor = ingestor
        self.registry = registry
        self.throughput = throughput
        self.metrics = metrics
        self.clock = clock
        limits = settings.limits
        self.max_image_bytes = limits.max_image_bytes
        self.ceiling = limits.max_image_bytes + limits.max_metadata_bytes + FORM_OVERHEAD  # whole request body

    async def upload(self, key: str | None, content_type: str | None, content_length: str | None,
                     body: AsyncIterator[bytes]) -> UploadResult:
        """Admit and ingest one upload; raises the contract's `GatewayError` for every refusal."""
        outcome = "INTERNAL_ERROR"
        try:
            device = await self.keycheck.authenticate(key, require_approved=True)
            self.rate_limiter.take(device.device_id)
            length = int(content_length) if content_length and content_length.isdigit() else 0
            if length > self.ceiling:
                raise image_too_large(self.max_image_bytes)
            await self.capacity.check(length)
            await self.store_probe.require()
            result = await self.ingestor.upload(
                device, content_type, body,
                held=device.origin == "quarantine",  # forwarded only once the cloud confirms the key
                length=length,
            )
            self.registry.touch(device, self.clock())
            if not result.duplicate:
                self.capacity.accepted(length)
                self.throughput.record_accepted(result.size)
            outcome = "duplicate_accepted" if result.duplicate else "accepted"
            return result
        except GatewayError as exc:
            outcome = exc.code
            raise
        finally:
            self.metrics.uploads.labels(outcome).inc()
