"""How the CLI reaches the gateway: the admin API of a running server, or the files of a stopped one.

DuckDB lets one process hold the catalog, so while a server runs the CLI goes through its admin
API (`[admin] token`). With no server running, the CLI opens the catalog itself and calls the very
same admin API in-process (ASGI, no socket), so both paths run one implementation.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any

import httpx

from gateway.catalog import CatalogLocked
from gateway.config import Settings
from gateway.runtime import Gateway


class ControlError(Exception):
    """A command could not be carried out; the message is for people."""


class Control:
    def __init__(self, client: httpx.AsyncClient, where: str, gateway: Gateway | None = None) -> None:
        self.client = client
        self.where = where
        self.gateway = gateway  # set when working on the files directly

    @property
    def offline(self) -> bool:
        return self.gateway is not None

    async def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        resp = await self.client.request(method, f"/api/admin{path}", json=body, params=params)
        try:
            payload = resp.json()
        except ValueError:
            raise ControlError(f"server answered {resp.status_code} without an envelope") from None
        if not payload.get("success"):
            err = payload.get("error") or {}
            detail = f" ({err.get('details')})" if err.get("details") else ""
            raise ControlError(f"{err.get('code', resp.status_code)}: {err.get('message', '')}{detail}")
        return payload.get("data")

    async def close(self) -> None:
        await self.client.aclose()
        if self.gateway is not None:
            await self.gateway.stop()


def admin_tls(settings: Settings) -> ssl.SSLContext | bool:
    """How the CLI checks the server's certificate over HTTPS.

    On loopback it does not: the server's certificate is rarely issued for 127.0.0.1, and only
    this host can answer there. Elsewhere (`[admin] url` naming another host) the admin token must
    not go to whoever answers, so the certificate is checked, hostname included, against the
    system's CAs and, when this host has it, the server's own certificate file (which covers a
    self-signed one)."""
    url = httpx.URL(settings.admin_url)
    if url.scheme != "https":
        return True  # no TLS, nothing to check
    if _is_loopback(url.host):
        return False
    ctx = ssl.create_default_context()
    certfile = settings.server.certfile
    if certfile and Path(certfile).is_file():
        ctx.load_verify_locations(cafile=certfile)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the server's own certificate is trusted as it is
    return ctx


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def connect(settings: Settings) -> Control:
    """The running server's admin API if one answers, else the files directly."""
    token = settings.admin.token
    if token:
        client = httpx.AsyncClient(
            base_url=settings.admin_url, headers={"Authorization": f"Bearer {token}"}, timeout=120.0,
            verify=admin_tls(settings),
        )
        try:
            await client.get("/api/health", timeout=2.0)
            return Control(client, settings.admin_url)
        except httpx.TransportError as exc:
            await client.aclose()
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ControlError(
                    f"the server at {settings.admin_url} did not show a certificate this host trusts ({exc}); "
                    "install its CA in the system's trust store, or run the CLI on the gateway's own host"
                ) from None
    from gateway.app import create_app

    gw = Gateway(settings)
    try:
        await gw.open_catalog()
    except CatalogLocked:
        hint = (
            "set [admin] token (or GATEWAY_ADMIN_TOKEN) to the server's admin token"
            if not token
            else f"its admin API at {settings.admin_url} did not answer; check [admin] url"
        )
        raise ControlError(f"a running server holds {gw.services.catalog.path}; {hint}") from None
    app = create_app(settings, gw, offline=True)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]  # Litestar is an ASGI app
    client = httpx.AsyncClient(transport=transport, base_url="http://offline", timeout=None)
    return Control(client, f"{settings.data_dir} (no server running)", gateway=gw)
