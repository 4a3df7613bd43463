"""Backups of the catalog and the key secret: a consistent copy, taken by the catalog's owner, with a manifest.

DuckDB lets one process hold the catalog file, so the copy is made by that process (the running
server, or the CLI when none runs): every acknowledged journal entry is moved into DuckDB first,
then DuckDB copies the whole database into a new file in one read transaction (`ATTACH` +
`COPY FROM DATABASE`), so writes go on while it runs and the copy is one point in time. The key
secret is copied beside it (the sealed device keys are useless without it) and `manifest.json`,
written last, lists each file with its size and SHA-256. Image bytes (the object store) are not
included: they may be large and are copied apart (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from gateway.catalog import Conn
from gateway.errors import Conflict, ValidationFailed
from gateway.system.files import fsync_path

FORMAT = "gateway-backup/1"
MANIFEST = "manifest.json"
CATALOG_FILE = "catalog.duckdb"
SECRET_FILE = "gateway.key"
OBJECTS_NOTE = ("image bytes are not in this backup: copy the object store apart "
                "(folder storage: the data folder's objects/ after this backup; S3: the bucket)")


class BackupFile(msgspec.Struct, kw_only=True):
    name: str
    bytes: int
    sha256: str


class Manifest(msgspec.Struct, kw_only=True):
    """What `manifest.json` says about a backup; `restore` refuses one that does not match it."""

    format: str
    gateway_version: str
    schema_version: int
    created_at: str  # ISO 8601 with its timezone (UTC)
    created_unix: float
    catalog_path: str
    secret_path: str
    key_fingerprint: str
    counts: dict[str, int]
    files: list[BackupFile]
    objects: str = OBJECTS_NOTE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare_dest(dest: Path) -> None:
    """`dest` must be an absolute path to a new or empty folder: a backup never mixes with other files."""
    if not dest.is_absolute():
        raise ValidationFailed("Backup folder must be an absolute path", str(dest))
    if dest.exists():
        if not dest.is_dir():
            raise Conflict("Backup destination is not a folder", str(dest))
        if any(dest.iterdir()):
            raise Conflict("Backup folder is not empty", f"{dest}: choose a new folder")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)


def copy_catalog(conn: Conn, target: Path) -> dict[str, int]:
    """Copy the whole catalog into a new DuckDB file `target`, as one point in time; returns row counts.

    `conn` is a reader's cursor (the journal already flushed into DuckDB). The counts are read in
    the same transaction as the copy, so they describe exactly what was copied."""
    alias = f"backup_{uuid.uuid4().hex}"
    (source,) = conn.execute("SELECT current_database()").fetchone() or ("",)
    conn.execute(f"ATTACH '{_quote(str(target))}' AS {alias}")
    try:
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(f'COPY FROM DATABASE "{source}" TO {alias}')
            counts = _counts(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute(f"DETACH {alias}")
    return counts


def _counts(conn: Conn) -> dict[str, int]:
    queries = {
        "devices": "SELECT count(*) FROM devices",
        "images": "SELECT count(*) FROM images",
        "batches": "SELECT count(*) FROM batches",
        "outbox_pending": "SELECT count(*) FROM outbox WHERE state IN ('pending', 'held')",
        "schema_version": "SELECT max(version) FROM schema_version",
    }
    counts = {}
    for name, sql in queries.items():
        row = conn.execute(sql).fetchone()
        counts[name] = int(row[0]) if row and row[0] is not None else 0
    return counts


def _quote(text: str) -> str:
    return text.replace("'", "''")


def finish_backup(dest: Path, counts: dict[str, int], secret: Path, fingerprint: str, catalog_path: Path,
                  version: str, now: float) -> Manifest:
    """Copy the key secret into `dest`, then write the manifest (last: a folder without one is no backup)."""
    shutil.copyfile(secret, dest / SECRET_FILE)
    os.chmod(dest / SECRET_FILE, 0o600)
    files = [BackupFile(name=n, bytes=(dest / n).stat().st_size, sha256=sha256_file(dest / n))
             for n in (CATALOG_FILE, SECRET_FILE)]
    schema = counts.pop("schema_version")
    manifest = Manifest(
        format=FORMAT, gateway_version=version, schema_version=schema,
        created_at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"), created_unix=now,
        catalog_path=str(catalog_path), secret_path=str(secret), key_fingerprint=fingerprint,
        counts=counts, files=files)
    _write_atomic(dest / MANIFEST, json.dumps(msgspec.to_builtins(manifest), indent=2).encode() + b"\n")
    for name in (CATALOG_FILE, SECRET_FILE):
        fsync_path(dest / name)
    fsync_path(dest)
    return manifest


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)



def read_manifest(src: Path) -> Manifest:
    """The manifest of the backup in `src`, checked against the files beside it; `BackupMismatch` if not."""
    path = src / MANIFEST
    if not path.is_file():
        raise BackupMismatch(f"{src} holds no {MANIFEST}: not a gateway backup (or an unfinished one)")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BackupMismatch(f"{path} is not a backup manifest: {exc}") from None
    if manifest.format != FORMAT:
        raise BackupMismatch(f"{path} is format {manifest.format!r}; this gateway reads {FORMAT!r}")
    names = {f.name for f in manifest.files}
    if names != {CATALOG_FILE, SECRET_FILE}:
        raise BackupMismatch(f"{path} lists {sorted(names)}, expected {[CATALOG_FILE, SECRET_FILE]}")
    for f in manifest.files:
        p = src / f.name
        if not p.is_file():
            raise BackupMismatch(f"{p} is listed in the manifest but missing")
        size = p.stat().st_size
        if size != f.bytes:
            raise BackupMismatch(f"{p} has {size} bytes, the manifest says {f.bytes}")
        if sha256_file(p) != f.sha256:
            raise BackupMismatch(f"{p} does not match the SHA-256 in the manifest: the copy is damaged")
    return manifest


class BackupMismatch(Exception):
    """A backup folder whose files do not match its manifest; the message is for people."""


def stamp(now: float | None = None) -> str:
    """A file-name-safe UTC time stamp, for the files a forced restore moves aside."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def manifest_dict(manifest: Manifest) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(manifest)
    return out
