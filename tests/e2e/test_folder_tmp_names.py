"""Issue 23, item 5: folder-store objects named `*.tmp` are real objects to listing and verify.

Before: the folder store hid every `*.tmp` file from its listing (its own temp files had that
suffix), so a device file `x.tmp` was stored but never verified, and a stray left under such a
name was never found.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from tests.conftest import jpeg_bytes
from tests.support.client import upload
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e


def test_objects_named_tmp_are_verified_and_strays_so_named_are_found(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_STORAGE_ORPHAN_GRACE_S": "60"})
    _, key = gw.add_device("cam-tmp")
    resp = upload(gw, key, jpeg_bytes(4096), filename="x.tmp")
    assert resp.status_code == 201, resp.text
    assert resp.json()["data"]["storage_key"].endswith("_x.tmp")
    report = json.loads(gw.cli("verify", "--full", "--json").stdout)
    assert report["objects"] == 1 and report["hashed"] == 1 and report["summary"]["unrepaired"] == 0, report

    stray = gw.workdir / "data" / "objects" / "raw-data" / f"{'ab' * 16}_left-by-a-crash.tmp"
    stray.write_bytes(b"\xff\xd8\xff stray")
    old = time.time() - 3600
    os.utime(stray, (old, old))
    report = json.loads(gw.cli("verify", "--json", check=False).stdout)
    assert report["summary"]["stray"] == 1, report
    assert [f["key"] for f in report["findings"]] == [f"raw-data/{stray.name}"]
    assert not list((gw.workdir / "data" / "objects" / ".tmp").glob("*"))  # no temp file left behind
