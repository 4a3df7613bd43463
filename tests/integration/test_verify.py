"""`gateway verify`: catalog against object store both ways, on a stopped server's files and
through a running server's admin API, on folder and S3 storage."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import jpeg_bytes
from tests.support.client import stored_objects, upload
from tests.support.gateway_proc import GatewayProcess, s3_env


def _damage_folder(gw: GatewayProcess, keys: list[str]) -> dict[str, str]:
    root = Path(gw.env["GATEWAY_DATA_DIR"]) / "objects"
    (root / keys[0]).unlink()  # missing
    data = bytearray((root / keys[1]).read_bytes())
    data[-10] ^= 0xFF
    (root / keys[1]).write_bytes(bytes(data))  # same size, other bytes
    old = root / "raw-data" / ("ab" * 16 + "_old-stray.jpg")
    old.write_bytes(jpeg_bytes(500))
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    young = root / "raw-data" / ("cd" * 16 + "_young-stray.jpg")
    young.write_bytes(jpeg_bytes(500))
    return {"missing": keys[0], "mismatch": keys[1], "old": old.relative_to(root).as_posix(),
            "young": young.relative_to(root).as_posix()}


def test_verify_offline_finds_and_repairs_what_is_safe(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw", {"GATEWAY_STORAGE_BACKEND": "folder",
                                          "GATEWAY_STORAGE_ORPHAN_GRACE_S": "3600"}).start()
    _, key = gw.add_device("cam-verify")
    keys = [upload(gw, key, jpeg_bytes(5000)).json()["data"]["storage_key"] for _ in range(5)]
    clean = json.loads(gw.cli("verify", "--json").stdout)
    assert clean["summary"]["unrepaired"] == 0 and clean["rows"] == 5 and clean["hashed"] == 5
    assert gw.stop() == 0
    damage = _damage_folder(gw, keys)

    found = gw.cli("verify", "--full", "--json", check=False)
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    by_kind = {(f["kind"], f["key"]) for f in report["findings"]}
    assert ("missing", damage["missing"]) in by_kind
    assert ("hash_mismatch", damage["mismatch"]) in by_kind
    assert ("stray", damage["old"]) in by_kind
    assert report["strays_in_grace"] == 1 and report["summary"]["stray"] == 1
    assert report["hashed"] == 4  # every row whose object exists

    table = gw.cli("verify", "--full", check=False).stdout
    assert "FINDING" in table and "hash_mismatch" in table and "--repair" in table

    repaired = json.loads(gw.cli("verify", "--full", "--repair", "--json", check=False).stdout)
    assert {f["kind"] for f in repaired["findings"] if f["repaired"]} == {"stray"}
    left = set(stored_objects(gw))
    assert damage["old"] not in left and damage["young"] in left  # the young one may be an upload in flight
    assert damage["mismatch"] in left  # never deleted: the bytes may still be worth something
    again = json.loads(gw.cli("verify", "--full", "--json", check=False).stdout)
    assert again["summary"]["stray"] == 0 and again["summary"]["missing"] == 1


def test_verify_online_through_the_admin_api_on_s3(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    s3 = request.getfixturevalue("s3")
    gw = GatewayProcess(tmp_path / "gw", s3_env(s3)).start()
    try:
        _, key = gw.add_device("cam-verify-s3")
        keys = [upload(gw, key, jpeg_bytes(5000)).json()["data"]["storage_key"] for _ in range(4)]
        client = s3.client()
        bucket = gw.env["GATEWAY_MINIO_BUCKET"]
        client.remove_object(bucket, keys[0])
        result = gw.cli("verify", "--json", check=False)  # the server runs: the CLI goes through its API
        assert result.returncode == 1, result.stderr
        report = json.loads(result.stdout)
        assert [(f["kind"], f["key"]) for f in report["findings"]] == [("missing", keys[0])]
        assert report["objects"] == 3 and report["rows"] == 4
        with gw.admin() as admin:
            progress = admin.get("/api/admin/verify/progress").json()["data"]
            assert progress["running"] is False and progress["phase"] == "hashing"
    finally:
        gw.stop()
