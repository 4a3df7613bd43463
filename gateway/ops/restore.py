"""Restore a backup (gateway/ops/backup.py) onto a stopped gateway: check it, then put its files in place.

Refuses a backup whose files do not match its manifest, a catalog a running server holds, and
existing files unless forced (then they are moved aside, never deleted). The catalog is copied
under a temporary name and renamed, so an interrupted restore leaves no half catalog.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import msgspec

from gateway.catalog.schema import MIGRATIONS
from gateway.ops.backup import CATALOG_FILE, SECRET_FILE, BackupMismatch, Manifest, read_manifest, stamp


class RestoreRefused(Exception):
    """Restoring would overwrite live or existing data; the message says what to do."""


class RestoreResult(msgspec.Struct, kw_only=True):
    manifest: Manifest
    catalog: str
    secret: str
    moved_aside: list[str]


def catalog_companions(catalog: Path) -> list[Path]:
    """The catalog's own files: DuckDB's WAL, the write journal and its quarantine."""
    return [catalog.with_name(catalog.name + suffix) for suffix in (".wal", ".journal", ".journal.quarantine")]


def check_not_held(catalog: Path) -> None:
    """Refuse when a process (a running server) holds the catalog file."""
    if not catalog.exists():
        return
    try:
        duckdb.connect(str(catalog), read_only=True).close()
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise RestoreRefused(f"a running server holds {catalog} ({exc}); stop it first, then restore") from None
        raise


def restore(src: Path, catalog: Path, secret: Path, force: bool, now: float) -> RestoreResult:
    """Put the backup in `src` in place as `catalog` and `secret` (a stopped gateway's paths)."""
    manifest = read_manifest(src)  # BackupMismatch when the files do not match
    if manifest.schema_version > len(MIGRATIONS):
        raise BackupMismatch(f"{src} was made by a newer gateway ({manifest.gateway_version}, catalog schema "
                             f"{manifest.schema_version}; this one knows {len(MIGRATIONS)}): restore it with that one")
    check_not_held(catalog)
    existing = [p for p in (catalog, *catalog_companions(catalog)) if p.exists()]
    same_secret = secret.exists() and secret.read_bytes() == (src / SECRET_FILE).read_bytes()
    if secret.exists() and not same_secret:
        existing.append(secret)
    if existing and not force:
        raise RestoreRefused(
            "restoring would replace " + ", ".join(str(p) for p in existing)
            + "; stop the server, then run again with --force (they are moved aside, not deleted)")
    moved = []
    suffix = f".before-restore-{stamp(now)}"
    for p in existing:
        aside = p.with_name(p.name + suffix)
        p.rename(aside)
        moved.append(str(aside))
    catalog.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _copy_in(src / CATALOG_FILE, catalog)
    if not same_secret:
        secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _copy_in(src / SECRET_FILE, secret)
    return RestoreResult(manifest=manifest, catalog=str(catalog), secret=str(secret), moved_aside=moved)


def _copy_in(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".restoring")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, 0o600)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["BackupMismatch", "RestoreRefused", "RestoreResult", "check_not_held", "restore"]
