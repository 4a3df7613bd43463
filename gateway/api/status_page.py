"""The status page at `/`: one server-rendered HTML page for site admins, refreshing itself.

Access (read-only): the admin token as `Authorization: Bearer`, or once as `?token=`, which sets
an HttpOnly cookie (its issue time and an HMAC of the token and that time, not the token; refused
by the server 7 days after issue) and redirects to `/` so the token leaves the address bar;
requests from loopback (127.0.0.1, ::1) that name a loopback host (`localhost`, 127.0.0.1, [::1])
in their Host header read it without a token unless `[admin] loopback_status_page` is off (set it
off where a reverse proxy or a container's port mapping makes remote requests look local). The
Host check stops DNS rebinding: a web page whose own name resolves to 127.0.0.1 sends its name.
Everything shown is HTML-escaped: file names, device names and error messages come from devices.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import Cookie
from litestar.response import Redirect

from gateway import __version__
from gateway.api.status_render import PageFigures, render_login, render_page
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.devices.registry import DeviceRegistry
from gateway.ops.activity import ERRORS_KEPT, ErrorEntry, RecentErrors, Throughput
from gateway.ops.health import Health
from gateway.ops.metrics import PREFIX, Metrics
from gateway.ops.status import dead_letters, device_activity, recent_uploads

COOKIE = "gateway_status"
COOKIE_MAX_AGE_S = 7 * 24 * 3600
RECENT_ROWS = 20
THROUGHPUT_MINUTES = 15


def cookie_value(admin_token: str, issued_at: float) -> str:
    """What the cookie holds: its issue time and a proof of the token and that time, useless as an
    admin API token and refused once `COOKIE_MAX_AGE_S` old."""
    issued = str(int(issued_at))
    proof = hmac.new(admin_token.encode(), b"gateway status page v2|" + issued.encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{proof}"


def cookie_valid(value: str, admin_token: str, now: float) -> bool:
    """A cookie this token issued, less than `COOKIE_MAX_AGE_S` ago (and not in the future)."""
    issued, _, _ = value.partition(".")
    if not admin_token or not issued.isdigit() or not -60 <= now - int(issued) < COOKIE_MAX_AGE_S:
        return False
    return _same(value, cookie_value(admin_token, int(issued)))


def _is_loopback(request: Request[Any, Any, Any]) -> bool:
    """From a loopback address AND naming a loopback host: a browser led to 127.0.0.1 by a
    rebinding DNS name sends that name as Host, and is refused."""
    return _loopback_address(request.client.host if request.client else "") and _loopback_host(
        request.headers.get("host", ""))


def _loopback_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _loopback_host(header: str) -> bool:
    """`localhost`, a loopback address, with or without a port (`[::1]:8080`, `127.0.0.1:8080`)."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".") == "localhost" or _loopback_address(host)


def _bearer(request: Request[Any, Any, Any]) -> str:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else ""


def _same(a: str, b: str) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def _html(body: str, status: int = 200) -> Response[str]:
    return Response(
        body, status_code=status, media_type="text/html; charset=utf-8",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
                 "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"},
    )


@get("/", include_in_schema=False)
async def status_page(request: Request[Any, Any, Any], settings: Settings, clock: Callable[[], float],
                      health: Health, catalog: Catalog, registry: DeviceRegistry, recent_errors: RecentErrors,
                      throughput: Throughput, metrics: Metrics, token: str | None = None) -> Response[Any]:
    admin_token = settings.admin.token
    if token is not None:
        if _same(token, admin_token):
            secure = bool(settings.server.certfile and settings.server.keyfile)
            cookie = Cookie(key=COOKIE, value=cookie_value(admin_token, clock()), path="/", httponly=True,
                            samesite="strict", secure=secure, max_age=COOKIE_MAX_AGE_S)
            return Redirect(path="/", status_code=303, cookies=[cookie], headers={"Cache-Control": "no-store"})
        return _html(render_login("That token is not the admin token.", enabled=bool(admin_token)), 401)
    allowed = (
        (settings.admin.loopback_status_page and _is_loopback(request))
        or _same(_bearer(request), admin_token)
        or cookie_valid(request.cookies.get(COOKIE, ""), admin_token, clock())
    )
    if not allowed:
        return _html(render_login("", enabled=bool(admin_token)), 401 if admin_token else 403)
    figures = await gather(health, catalog, registry, recent_errors, throughput, metrics, clock, settings)
    return _html(render_page(figures))


async def gather(health: Health, catalog: Catalog, registry: DeviceRegistry, recent_errors: RecentErrors,
                 throughput: Throughput, metrics: Metrics, clock: Callable[[], float],
                 settings: Settings) -> PageFigures:
    """Every figure the page shows, read once per page view."""
    report = await health.refresh_gauges()
    devices = await catalog.read(device_activity)
    # Uploads refresh last-seen in memory only (check-ins persist it): the registry knows best.
    seen = {d.device_id: d.last_seen_at for d in registry.all()}
    for d in devices:
        d.last_seen_at = max((t for t in (d.last_seen_at, seen.get(d.device_id)) if t is not None), default=None)
    devices.sort(key=lambda d: -max(d.last_seen_at or 0.0, d.last_upload_at or 0.0))
    uploads = await catalog.read(lambda c: recent_uploads(c, RECENT_ROWS))
    dead = await catalog.read(lambda c: dead_letters(c, RECENT_ROWS)) if report.dead_count else []
    return PageFigures(
        report=report, devices=devices, uploads=uploads, dead=dead,
        errors=device_errors(recent_errors.latest(ERRORS_KEPT))[:RECENT_ROWS],
        minutes=throughput.last_minutes(THROUGHPUT_MINUTES),
        now=clock(), uptime_s=health.uptime_s(), version=__version__,
        forwarding_on=health.forwarding_on, cloud_url=settings.cloud.url,
        near_dup_saved_bytes=int(_sample(metrics, "near_duplicate_bytes_not_sent_total")),
        near_dup_count=int(sum(s.value for m in metrics.near_duplicates.collect() for s in m.samples
                               if s.name.endswith("_total"))),
    )


def device_errors(errors: list[ErrorEntry]) -> list[ErrorEntry]:
    """The errors devices met: not the admin API's (the CLI shows those itself) nor this page's sign-in."""
    return [x for x in errors if not (x.path.startswith("/api/admin") or x.path == "/")]


def _sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"{PREFIX}_{name}") or 0.0


ROUTES = [status_page]
