"""Issue 23, items 2 and 4: a start that would lose or misread acknowledged data stops with exit
status 2 and a message that names the file, instead of going on quietly.

Before: a damaged record mid-journal was taken for a torn end (the file was cut there and the
acknowledged records after it dropped without a word), and a missing key secret was replaced by a
new one (devices still logged in, but the forwarder could never open their keys again).
"""

from __future__ import annotations

import json
import secrets
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import duckdb
import httpx
import msgspec
import pytest

from gateway.catalog.journal import frame
from gateway.catalog.records import FORMAT, BatchOpened, write
from tests.conftest import jpeg_bytes
from tests.support.client import admin_status, metrics, upload, wait_for
from tests.support.fakecloud import FakeCloud
from tests.support.gateway_proc import GatewayProcess

pytestmark = pytest.mark.e2e


def _refused(gw: GatewayProcess, timeout: float = 60.0) -> str:
    """Start `gw`, expect it to stop by itself with status 2; returns its output."""
    gw.start(wait_ready=False)
    assert gw.wait(timeout) == 2, gw.log_tail()
    return gw.log_path.read_text(errors="replace")


def test_a_damaged_record_mid_journal_stops_the_start_and_keeps_the_file(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})
    gw.add_device("cam-journal")
    assert gw.stop() == 0
    journal = gw.workdir / "data" / "catalog.duckdb.journal"
    frames = [frame(write([BatchOpened(batch_id=f"batch_{n}", device_id="dev_j", opened_at=1.0)])) for n in range(5)]
    data = bytearray(b"".join(frames))
    data[len(frames[0]) + 10] ^= 0x01  # inside the second record's body: three whole records follow
    journal.write_bytes(bytes(data))

    out = _refused(gw)
    assert str(journal) in out and f"byte {len(frames[0])}" in out
    assert journal.read_bytes() == bytes(data)  # byte for byte
    assert sorted(p.name for p in journal.parent.glob("catalog.duckdb.journal*")) == [journal.name]

    journal.write_bytes(b"".join(frames) + frames[0][:7])  # a torn tail only: cut, kept aside, served
    gw.start()
    assert journal.stat().st_size == 0
    (aside,) = journal.parent.glob("catalog.duckdb.journal.torn-*")
    assert aside.read_bytes() == frames[0][:7]


def test_a_journal_written_by_a_newer_gateway_stops_the_start_and_keeps_the_file(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})
    assert gw.stop() == 0
    journal = gw.workdir / "data" / "catalog.duckdb.journal"
    body = msgspec.msgpack.encode([FORMAT + 1, [["image_deleted", "img_1"]]])
    data = frame(write([])) + struct.pack("<II", len(body), zlib.crc32(body)) + body  # the last record: no torn tail
    journal.write_bytes(data)

    out = _refused(gw)
    assert str(journal) in out and f"journal format {FORMAT + 1}, written by a newer gateway" in out
    assert journal.read_bytes() == data
    assert sorted(p.name for p in journal.parent.glob("catalog.duckdb.journal*")) == [journal.name]


def test_a_moved_or_different_key_secret_stops_the_start(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder"})
    gw.add_device("cam-secret")  # a sealed key in the catalog from now on
    assert gw.stop() == 0
    secret = Path(gw.env["GATEWAY_KEYS_SECRET_FILE"])
    kept = secret.with_name("kept.key")
    shutil.move(secret, kept)

    out = _refused(gw)
    assert str(secret) in out and "missing" in out
    assert not secret.exists()  # no new secret made behind the operator's back

    secret.write_bytes(b"\x01" * 32)  # a secret, but not the one the keys were sealed with
    out = _refused(gw)
    assert str(secret) in out and "does not match" in out

    shutil.move(kept, secret)
    gw.start()
    assert str(secret) in gw.log_path.read_text(errors="replace")


def test_a_relative_secret_path_is_resolved_and_logged(start_gateway: Callable[..., GatewayProcess]) -> None:
    gw = start_gateway({"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_KEYS_SECRET_FILE": "./secrets/gw.key"})
    assert str(gw.workdir / "secrets" / "gw.key") in gw.log_path.read_text(errors="replace")


def test_a_key_that_cannot_be_opened_is_a_dead_letter_with_its_own_reason(
    start_gateway: Callable[..., GatewayProcess], cloud: FakeCloud,
) -> None:
    """The secret matches, but one device's sealed key does not open (damaged in the catalog).
    Before: 26 tracebacks in 12 s, attempts stayed 0, nothing reached dead letters, and the
    status showed the cloud online with no last error."""
    env = {"GATEWAY_STORAGE_BACKEND": "folder", "GATEWAY_CLOUD_URL": cloud.url,
           "GATEWAY_FORWARD_BACKOFF_BASE_S": "0.2", "GATEWAY_FORWARD_BACKOFF_MAX_S": "1.0"}
    gw = start_gateway(env)
    device_id, key = gw.add_device("cam-sealed")
    cloud.add_device(key, device_id=device_id)
    assert gw.stop() == 0
    with duckdb.connect(str(gw.workdir / "data" / "catalog.duckdb")) as db:
        db.execute("UPDATE devices SET key_sealed = ? WHERE device_id = ?", [secrets.token_bytes(60), device_id])
    gw.start()
    for n in range(3):
        assert upload(gw, key, jpeg_bytes(4096 + n)).status_code == 201

    status = wait_for("three dead letters", lambda: (s := admin_status(gw))["dead_count"] == 3 and s)
    assert status["key_unreadable_count"] == 3
    assert "KEY_UNREADABLE" in (status["last_error"] or "")
    dead = json.loads(gw.cli("outbox", "list", "--dead", "--json").stdout)
    assert len(dead) == 3 and all(r["last_error"].startswith("KEY_UNREADABLE") for r in dead)
    assert cloud.attempts == []  # nothing was sent as the device
    assert "unreadable" in gw.cli("status").stdout
    assert metrics(gw)["acusight_gateway_dead_letters_key_unreadable"] == 3.0
    assert "key unreadable" in httpx.get(f"{gw.url}/", timeout=10).text.lower()
    time.sleep(2)  # a few forwarder rounds: still no traceback loop
    assert "Traceback" not in gw.log_path.read_text(errors="replace")
