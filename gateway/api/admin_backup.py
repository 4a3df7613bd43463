"""Admin route of `gateway backup` (mounted on the admin router, behind its token guard).

`POST /api/admin/backup {"dest": "/abs/folder"}`: the process that owns the catalog writes a
consistent copy of it, the key secret and a manifest into a new folder on its own host
(gateway/ops/backup.py). One backup at a time: a second one gets 409.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from litestar import Request, Response, post

from gateway import __version__
from gateway.api.body import read_json_body
from gateway.api.envelope import ok
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.devices.keysecret import KeySecret, secret_path
from gateway.errors import Conflict, ValidationFailed
from gateway.ops import backup

log = logging.getLogger("gateway.ops.backup")
_running = anyio.Lock()


class BackupRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    dest: str


@post("/backup", status_code=201)
async def run_backup(request: Request[Any, Any, Any], settings: Settings, catalog: Catalog, key_secret: KeySecret,
                     clock: Callable[[], float]) -> Response[bytes]:
    try:
        body = msgspec.json.decode(await read_json_body(request, settings) or b"{}", type=BackupRequest)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ValidationFailed("Invalid request body", str(exc)) from None
    if _running.locked():
        raise Conflict("A backup is already running", "wait for it to finish")
    async with _running:
        dest = Path(body.dest)
        await anyio.to_thread.run_sync(backup.prepare_dest, dest)
        counts = await catalog.read(lambda c: backup.copy_catalog(c, dest / backup.CATALOG_FILE))
        secret = secret_path(settings.keys.secret_file)
        manifest = await anyio.to_thread.run_sync(
            lambda: backup.finish_backup(dest, counts, secret, key_secret.fingerprint, catalog.path,
                                         __version__, clock()))
    log.info("backup written to %s: %s", dest, ", ".join(f"{k} {v}" for k, v in manifest.counts.items()))
    return ok(backup.manifest_dict(manifest), status=201)


ROUTES = [run_backup]
