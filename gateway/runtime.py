"""The running gateway: its services (built once by `gateway.services.build_services`), started and
stopped in a known order.

Start: data folders -> catalog (migrations) -> key secret -> devices -> forward cache -> ingest
(spool, open batches) -> object store check and leftover upload intents settled; then the
background loops (seen keys, idle CPU for near-duplicates, batch sealer, manifest writer,
reconciliation, forwarder, retention).
Stop: refuse new work (readiness off) -> background loops cancelled -> uploads whose requests went
away settled -> catalog drained and closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.outbound import Outbound
from gateway.services import Services, build_services

log = logging.getLogger("gateway")


class Gateway:
    """Owns the services' lifecycle; `create_app` serves them over HTTP."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time,
                 http: Outbound | None = None) -> None:
        self.settings = settings
        self.services: Services = build_services(settings, clock, http or Outbound())

    async def open_catalog(self) -> None:
        """Catalog and devices only: what the CLI needs to work on a stopped server's files."""
        svc = self.services
        self.settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # catalog, spool, objects: owner only
        await anyio.to_thread.run_sync(svc.catalog.open)
        await svc.key_secret.load()
        await svc.registry.load()

    async def start(self) -> None:
        """Open what the services need (files, the catalog, the outbound session), in order."""
        svc = self.services
        svc.outbox_changed.bind(asyncio.get_running_loop())
        await self.open_catalog()  # first: a locked catalog ends the start before any session opens
        await svc.http.start()
        if svc.forward_cache is not None:
            await anyio.to_thread.run_sync(svc.forward_cache.open)
        await svc.ingestor.start()
        try:
            await svc.store_probe.require()
            await svc.reconciler.settle_at_start()
        except GatewayError as exc:
            log.error("object store not ready at start-up (%s); uploads get 503 until it answers", exc)
            # Leftover upload intents wait for the store; the reconcile loop retries them soon.
            svc.reconciler.store_down_at_start()

    def run_background(self, tg: TaskGroup) -> None:
        svc = self.services
        tg.start_soon(svc.ingestor.keep_seen_keys)
        tg.start_soon(svc.ingestor.watch_cpu)
        tg.start_soon(svc.sealer.run)
        tg.start_soon(svc.manifests.run)
        tg.start_soon(svc.reconciler.run)
        if svc.forwarder is not None:
            tg.start_soon(svc.forwarder.run)
        if svc.retention is not None:
            tg.start_soon(svc.retention.run)

    def stop_accepting(self) -> None:
        """Shutdown has begun (a stop signal, the lifespan's end): readiness turns 503 at once."""
        self.services.health.stop_accepting()

    async def stop(self) -> None:
        svc = self.services
        svc.health.stop_accepting()
        await svc.ingestor.finish(timeout_s=10.0)  # uploads whose requests went away, settled first
        if svc.forward_cache is not None:
            await anyio.to_thread.run_sync(svc.forward_cache.close)
        await anyio.to_thread.run_sync(svc.catalog.close)
        svc.store.close()
        await svc.http.aclose()
