"""Operations endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from litestar import Response, get
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.envelope import ok
from gateway.errors import GatewayError
from gateway.runtime import Gateway


@get("/api/health")
async def health(gw: Gateway) -> Response[bytes]:
    return ok({"status": "alive", "uptime_s": round(gw.clock() - gw.started_at, 1)})


@get("/api/ready")
async def ready(gw: Gateway) -> Response[bytes]:
    try:
        checks = await gw.readiness()
    except Exception:
        gw.metrics.ready.set(0)
        raise
    gw.metrics.ready.set(1)
    return ok({"status": "ready", "checks": checks})


@get("/metrics")
async def metrics(gw: Gateway) -> Response[bytes]:
    await gw.refresh_gauges()
    try:  # the ready gauge must not depend on someone having probed /api/ready lately
        await gw.readiness()
        gw.metrics.ready.set(1)
    except GatewayError:
        gw.metrics.ready.set(0)
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)



ROUTES = [health, ready, metrics]
