"""Issue 23, item 3: file names long in UTF-8 bytes are stored, listed and drained on both backends.

Before: 90 CJK characters (270 bytes) or 70 x U+1D400 (280 bytes) made the object's file name
longer than the file system's 255 bytes: folder storage answered 503 with Retry-After (the device
retried forever), and with S3 the drain job failed that batch on every run and never acked it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, jpeg_bytes
from tests.e2e.test_drain import image_files, run_drain, sync_batches
from tests.support.client import upload, wait_for
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e
NAMES = ["图" * 90 + ".jpg", "\U0001d400" * 70 + ".jpg"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_names_long_in_bytes_are_stored_and_drained(
    backend: str, start_gateway: Callable[..., GatewayProcess], backend_env: Callable[[str], dict[str, str]],
    tmp_path: Path,
) -> None:
    gw = start_gateway(backend_env(backend) | {"GATEWAY_BATCHES_TIMEOUT_S": "600"})
    _, key = gw.add_device("cam-cjk")
    sent: dict[str, bytes] = {}
    for name in NAMES:
        image = jpeg_bytes(4096)
        resp = upload(gw, key, image, filename=name)
        assert resp.status_code == 201, resp.text
        data = resp.json()["data"]
        assert data["storage_key"].endswith(".jpg")
        assert len(data["storage_key"].rsplit("/", 1)[1].encode()) <= 255
        sent[data["image_id"]] = image
    batch = next(b for b in sync_batches(gw) if b["state"] == "collecting")
    gw.cli("batches", "seal", batch["batch_id"])
    wait_for("a drainable batch", lambda: len(sync_batches(gw, "forwarded")) == 1)

    verify = json.loads(gw.cli("verify", "--full", "--json").stdout)
    assert verify["summary"]["unrepaired"] == 0 and verify["hashed"] == 2, verify

    dest = tmp_path / "drained"
    result = run_drain(gw, dest)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["batches_failed"] == {} and report["batches_drained"] == [batch["batch_id"]]
    files = image_files(dest)
    assert len(files) == 2
    for image_id, image in sent.items():
        (path,) = [p for p in files if p.name.startswith(f"{image_id}_")]
        assert path.read_bytes() == image and path.name.endswith(".jpg")
