"""Issue 23, items 7 and 13: a full file system anywhere on the upload path answers 507
INSUFFICIENT_STORAGE with Retry-After, and readiness is 503 while the catalog cannot take a write.

Each part (spool, catalog journal, folder objects) is put alone on a small real tmpfs and filled,
the others keeping room. Before: a full journal answered 503 SERVICE_UNAVAILABLE, and
`/api/ready` stayed 200 while every upload was refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import jpeg_bytes
from tests.integration.test_faults import fill, tmpfs
from tests.support.client import stored_objects, upload, wait_for
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("part", ["spool", "journal", "objects"])
def test_a_full_file_system_on_the_upload_path_is_507(tmp_path: Path, part: str) -> None:
    work = tmp_path / "gw"
    data = work / "data"
    full = tmp_path / "full"
    with tmpfs(full, "4m"):
        gw = GatewayProcess(work, {"GATEWAY_STORAGE_BACKEND": "folder"}).start()
        try:
            _, key = gw.add_device("cam-full")
            assert upload(gw, key, jpeg_bytes(4000)).status_code == 201
            gw.stop()
            # The part under test lives on the small file system (a symlink to it), the rest keeps room.
            target = {"spool": data / "spool", "journal": data / "catalog.duckdb.journal",
                      "objects": data / "objects"}[part]
            if target.is_dir():
                shutil.move(target, full / part)
            else:
                target.unlink(missing_ok=True)
            target.symlink_to(full / part)
            gw.start()
            assert upload(gw, key, jpeg_bytes(4000)).status_code == 201
            before = set(stored_objects(gw))
            # The journal is emptied once its records are in DuckDB; a page it still holds would take more.
            wait_for("an empty journal", lambda: part != "journal" or (full / part).stat().st_size == 0)
            ballast = fill(full)

            resp = upload(gw, key, jpeg_bytes(4000))
            assert resp.status_code == 507, resp.text
            assert resp.json()["error"]["code"] == "INSUFFICIENT_STORAGE"
            assert int(resp.headers["retry-after"]) > 0
            assert set(stored_objects(gw)) == before  # nothing kept of the refused upload
            ready = httpx.get(f"{gw.url}/api/ready", timeout=10)
            if part == "journal":  # the catalog cannot take a write: uploads are refused, so not ready
                assert ready.status_code == 503, ready.text

            ballast.unlink()
            assert upload(gw, key, jpeg_bytes(4000)).status_code == 201  # room again: no restart needed
            assert httpx.get(f"{gw.url}/api/ready", timeout=10).status_code == 200
        finally:
            gw.stop()
