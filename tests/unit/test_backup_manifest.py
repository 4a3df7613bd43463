"""`gateway restore` refuses a backup that does not match its manifest, or one made by a newer
gateway, before anything is put in place (the whole round trip: tests/e2e/test_backup_restore.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.catalog.schema import MIGRATIONS
from gateway.ops.backup import BackupMismatch, read_manifest, sha256_file
from gateway.ops.restore import restore


def fake_backup(root: Path, schema: int = len(MIGRATIONS)) -> Path:
    src = root / "bk"
    src.mkdir()
    (src / "catalog.duckdb").write_bytes(b"catalog bytes")
    (src / "gateway.key").write_bytes(b"k" * 32)
    files = [{"name": n, "bytes": (src / n).stat().st_size, "sha256": sha256_file(src / n)}
             for n in ("catalog.duckdb", "gateway.key")]
    (src / "manifest.json").write_text(json.dumps({
        "format": "gateway-backup/1", "gateway_version": "9.9.9", "schema_version": schema,
        "created_at": "2026-12-04T20:00:00+00:00", "created_unix": 0.0, "catalog_path": "/x", "secret_path": "/y",
        "key_fingerprint": "f", "counts": {}, "files": files}))
    return src


def test_a_matching_manifest_reads(tmp_path: Path) -> None:
    assert read_manifest(fake_backup(tmp_path)).gateway_version == "9.9.9"


@pytest.mark.parametrize(("damage", "said"), [
    (lambda src: (src / "gateway.key").unlink(), "missing"),
    (lambda src: (src / "catalog.duckdb").write_bytes(b"other bytes!!"), "SHA-256"),
    (lambda src: (src / "catalog.duckdb").write_bytes(b"short"), "bytes, the manifest says"),
    (lambda src: (src / "manifest.json").unlink(), "not a gateway backup"),
    (lambda src: (src / "manifest.json").write_text("{}"), "not a backup manifest"),
])
def test_a_backup_that_does_not_match_is_refused(tmp_path: Path, damage: object, said: str) -> None:
    src = fake_backup(tmp_path)
    damage(src)  # type: ignore[operator]
    with pytest.raises(BackupMismatch, match=said):
        restore(src, tmp_path / "data" / "catalog.duckdb", tmp_path / "secret.key", False, 0.0)
    assert not (tmp_path / "data").exists() and not (tmp_path / "secret.key").exists()


def test_a_newer_gateways_backup_is_refused(tmp_path: Path) -> None:
    src = fake_backup(tmp_path, schema=len(MIGRATIONS) + 1)
    with pytest.raises(BackupMismatch, match="newer gateway"):
        restore(src, tmp_path / "data" / "catalog.duckdb", tmp_path / "secret.key", False, 0.0)
