"""How the CLI reaches the gateway: the admin API of a running server, or the files of a stopped one.

DuckDB lets one process hold the catalog, so while a server runs the CLI goes through its admin
API (`[admin] token`). With no server running, the CLI opens the catalog itself and calls the very
same admin API in-process (ASGI, no socket), so both paths run one implementation.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from pathlib import Path
from typing import Any

import httpx

from gateway.catalog import CatalogLocked
from gateway.config import DEFAULT_CONFIG_PATH, LoadedSettings, Settings
from gateway.config.admintoken import AdminTokenError, load_admin_token
from gateway.envelope import read_envelope
from gateway.runtime import Gateway
from gateway.services import catalog_path


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
        answer = read_envelope(resp.content)
        if not answer.is_object:
            raise ControlError(f"server answered {resp.status_code} without an envelope")
        if not answer.success:
            raise ControlError(answer.error.describe(resp.status_code))
        return answer.data

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


async def probe(loaded: LoadedSettings) -> Control | None:
    """A client of the running server's admin API if one answers with a token this CLI has, else None."""
    settings = loaded.settings
    from_file = not settings.admin.token
    try:
        token = load_admin_token(settings)
        if token and from_file:
            loaded.sources["admin.token"] = f"admin.token_file {settings.admin.token_file}"
    except AdminTokenError as exc:
        raise ControlError(str(exc)) from None
    if not token:
        return None
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
    return None


def where_to_set(loaded: LoadedSettings) -> str:
    """Which setting tells the CLI where the server listens, and in which file to change it."""
    shown = loaded.describe("admin", "url") if loaded.settings.admin.url else loaded.describe("server", "listen")
    target = f"in {loaded.file}" if loaded.file else "in a settings file given with --config FILE or GATEWAY_CONFIG"
    return (f"{shown}; if the server listens elsewhere (serve --listen), set server.listen (or admin.url) {target} "
            "to that address")


async def connect(loaded: LoadedSettings) -> Control:
    """The running server's admin API if one answers, else the files directly (never created here)."""
    settings = loaded.settings
    ctl = await probe(loaded)
    if ctl is not None:
        return ctl
    path = catalog_path(settings)
    if not path.exists():
        raise ControlError(f"no catalog at {path} ({loaded.describe('data', 'dir')}), and no server answered at "
                           f"{settings.admin_url}. {_found_how(loaded)}")
    secret = Path(settings.keys.secret_file)
    if not secret.exists():
        raise ControlError(f"the key secret {secret} is missing ({loaded.describe('keys', 'secret_file')}) while "
                           f"the catalog {path} exists; restore it, or point keys.secret_file at it")
    from gateway.app import create_app

    gw = Gateway(settings)
    try:
        await gw.open_catalog()
    except CatalogLocked as exc:
        pid = re.search(r"PID (\d+)", str(exc))
        who = f"a running server (PID {pid.group(1)})" if pid else "a running server"
        hint = (
            f"its admin token was not found: {loaded.describe('admin', 'token_file')} does not exist; set "
            "GATEWAY_ADMIN_TOKEN to the server's admin token, or point admin.token_file at its token file"
            if not settings.admin.token
            else f"its admin API did not answer at {settings.admin_url}: {where_to_set(loaded)}"
        )
        raise ControlError(f"{who} holds {gw.services.catalog.path}; {hint}") from None
    app = create_app(settings, gw, offline=True)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]  # Litestar is an ASGI app
    client = httpx.AsyncClient(transport=transport, base_url="http://offline", timeout=None)
    return Control(client, f"{settings.data_dir} (no server running)", gateway=gw)


def _found_how(loaded: LoadedSettings) -> str:
    if loaded.file is not None:
        return f"Settings from {loaded.file}; is data.dir right there, and has the server been started once?"
    return (f"No settings file was found ({DEFAULT_CONFIG_PATH} is not in {Path.cwd()}), so relative paths are "
            "this folder's: run the CLI with --config FILE (or GATEWAY_CONFIG=FILE) naming the server's settings, "
            "or from the server's folder")
