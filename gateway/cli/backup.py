"""`gateway backup DEST` and `gateway restore SRC`: the catalog and the key secret, with a manifest.

Backup goes through whoever owns the catalog (the running server's admin API, or the files when
none runs), so the copy is consistent while uploads go on. Restore works on a stopped gateway's
files only, and checks the result by opening it as the server would (key secret included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from gateway.cli.control import Control, connect
from gateway.config import LoadedSettings, Settings
from gateway.devices.keysecret import secret_path
from gateway.errors import StartRefused
from gateway.humanize import human_bytes
from gateway.ops.backup import OBJECTS_NOTE, BackupMismatch
from gateway.ops.restore import RestoreRefused, restore
from gateway.services import catalog_path


def add_arguments(sub: Any) -> list[argparse.ArgumentParser]:
    bk = sub.add_parser("backup", help="copy the catalog and the key secret into a new folder, with a manifest")
    bk.add_argument("dest", metavar="DEST", help="a new or empty folder (on the server's host)")
    rs = sub.add_parser("restore", help="put a backup in place on a stopped gateway")
    rs.add_argument("src", metavar="SRC", help="a folder written by `gateway backup`")
    rs.add_argument("--force", action="store_true",
                    help="replace an existing catalog and key secret (moved aside, not deleted)")
    return [bk, rs]


async def cmd_backup(ctl: Control, args: argparse.Namespace) -> int:
    dest = Path(args.dest).expanduser().absolute()
    data = await ctl.call("POST", "/backup", {"dest": str(dest)})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in data["counts"].items())
    size = sum(f["bytes"] for f in data["files"])
    print(f"backup written to {dest} ({human_bytes(size)}, taken from {ctl.where} at {data['created_at']})")
    print(f"  holds: {counts}")
    print(f"  note: {OBJECTS_NOTE}")
    return 0


def cmd_restore(loaded: LoadedSettings, args: argparse.Namespace) -> int:
    settings = loaded.settings
    src = Path(args.src).expanduser().absolute()
    if _server_answers(settings):
        print(f"gateway: refusing to restore: a server answers at {settings.admin_url}; stop it first",
              file=sys.stderr)
        return 2
    catalog, secret = catalog_path(settings).absolute(), secret_path(settings.keys.secret_file)
    try:
        result = restore(src, catalog, secret, args.force, time.time())
    except BackupMismatch as exc:
        print(f"gateway: refusing to restore: {exc}", file=sys.stderr)
        return 2
    except RestoreRefused as exc:
        print(f"gateway: refusing to restore: {exc}", file=sys.stderr)
        return 2
    try:
        status = anyio.run(_opened_status, loaded)
    except StartRefused as exc:
        print(f"gateway: restored files do not open: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"restored": {"catalog": result.catalog, "secret": result.secret,
                                       "moved_aside": result.moved_aside, "created_at": result.manifest.created_at},
                          "status": status}, indent=2))
        return 0
    print(f"restored the backup of {result.manifest.created_at} into {result.catalog} and {result.secret}")
    for path in result.moved_aside:
        print(f"  moved aside: {path}")
    print(f"  opened it: {status['devices']} device(s), {status['images']} image(s), "
          f"{status['backlog_count']} pending")
    print(f"  note: {OBJECTS_NOTE}; then start the server and run `gateway verify`")
    return 0


def _server_answers(settings: Settings) -> bool:
    try:
        httpx.get(f"{settings.admin_url}/api/health", timeout=2.0, verify=False)
    except httpx.TransportError:
        return False
    return True


async def _opened_status(loaded: LoadedSettings) -> dict[str, Any]:
    """Open the restored catalog as the server would (the key secret must match it); its status."""
    ctl = await connect(loaded)
    try:
        status: dict[str, Any] = await ctl.call("GET", "/status")
        return status
    finally:
        await ctl.close()
