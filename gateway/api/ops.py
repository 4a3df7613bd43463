"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from litestar import Response, get
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.envelope import ok
from gateway.errors import GatewayError
from gateway.ops.health import Health
from gateway.ops.metrics import Metrics


@get("/api/health")
async def health(health: Health) -> Response[bytes]:
    return ok({"status": "alive", "uptime_s": round(health.uptime_s(), 1)})


@get("/api/ready")
async def ready(health: Health, metrics: Metrics) -> Response[bytes]:
    try:
        checks = await health.readiness()
    except Exception:
        metrics.ready.set(0)
        raise
    metrics.ready.set(1)
    return ok({"status": "ready", "checks": checks})


@get("/metrics")
async def metrics(health: Health, metrics: Metrics) -> Response[bytes]:
    await health.refresh_gauges()
    try:  # the ready gauge must not depend on someone having probed /api/ready lately
        await health.readiness()
        metrics.ready.set(1)
    except GatewayError:
        metrics.ready.set(0)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)



ROUTES = [health, ready, metrics]
