"""Batches: sealing by count and by time, the Parquet manifest, its rewrite when cloud ids arrive,
and the `batches` CLI, on both storage backends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import duckdb
import httpx
import pytest
import xxhash
from minio import Minio

from gateway.batches.manifests import COLUMNS, ManifestWriter, manifest_key, stale_manifests
from gateway.catalog import Catalog
from gateway.ops.metrics import Metrics
from gateway.storage import FolderStore
from tests.conftest import BACKENDS, png_bytes
from tests.support.client import upload, wait_for
from tests.support.gateway_proc import SYNC_TOKEN, GatewayProcess, free_port

MAX_IMAGES = 5
TIMEOUT_S = 3  # long enough for five uploads on a busy machine, short enough to wait for


def admin_batches(gw: GatewayProcess) -> list[dict[str, Any]]:
    with gw.admin() as client:
        resp = client.get("/api/admin/batches", params={"limit": 1000})
        resp.raise_for_status()
        return resp.json()["data"]  # type: ignore[no-any-return]


def read_manifest(data: bytes, tmp_path: Path) -> tuple[list[str], list[tuple[Any, ...]]]:
    path = tmp_path / f"m{time.monotonic_ns()}.parquet"
    path.write_bytes(data)
    with duckdb.connect() as db:
        rel = db.execute(f"SELECT {', '.join(COLUMNS)} FROM read_parquet(?)", [str(path)])
        rows = rel.fetchall()
        types = [str(t) for _, t, *_ in db.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()]
    return types, rows


def stored_manifest(gw: GatewayProcess, batch_id: str) -> bytes | None:
    """The manifest object as the store holds it (not through the gateway)."""
    key = manifest_key(batch_id)
    if gw.env.get("GATEWAY_STORAGE_BACKEND") == "minio":
        client = Minio(gw.env["GATEWAY_MINIO_ENDPOINT"], gw.env["GATEWAY_MINIO_ACCESS_KEY"],
                       gw.env["GATEWAY_MINIO_SECRET_KEY"], secure=False)
        try:
            resp = client.get_object(gw.env["GATEWAY_MINIO_BUCKET"], key)
        except Exception:
            return None
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()
    path = Path(gw.env["GATEWAY_DATA_DIR"]) / "objects" / key
    return path.read_bytes() if path.is_file() else None


@pytest.mark.parametrize("backend", BACKENDS)
def test_sealing_by_count_then_by_time_and_the_manifests(
    backend: str, start_gateway: Callable[..., GatewayProcess], backend_env: Callable[[str], dict[str, str]],
    tmp_path: Path,
) -> None:
    # A cloud that never answers: forwarding is on, so sealed batches stay `sealed`.
    env = backend_env(backend) | {
        "GATEWAY_BATCHES_MAX_IMAGES": str(MAX_IMAGES),
        "GATEWAY_BATCHES_TIMEOUT_S": str(TIMEOUT_S),
        "GATEWAY_CLOUD_URL": f"http://127.0.0.1:{free_port()}/api",
    }
    gw = start_gateway(env)
    device_id, key = gw.add_device("cam-batches")
    sent: dict[str, tuple[bytes, str, str]] = {}  # image_id -> bytes, file name, metadata
    for n in range(23):
        image = png_bytes(f"image {n}".encode())
        metadata = json.dumps({"model_id": "m1", "n": n, "note": "é ✓"}, ensure_ascii=False)
        resp = upload(gw, key, image, filename=f"frame-{n}.png", metadata=metadata, content_type="image/png")
        assert resp.status_code == 201, resp.text
        sent[resp.json()["data"]["image_id"]] = (image, f"frame-{n}.png", metadata)

    batches = admin_batches(gw)
    assert sorted((b["state"], b["image_count"]) for b in batches) == [("collecting", 3)] + [("sealed", 5)] * 4
    assert all(b["device_id"] == device_id for b in batches)
    last = next(b for b in batches if b["state"] == "collecting")

    # No further upload: the timer seals the last batch.
    sealed = wait_for("the timer to seal the last batch", lambda: next(
        (b for b in admin_batches(gw) if b["batch_id"] == last["batch_id"] and b["state"] == "sealed"), None))
    assert sealed["image_count"] == 3
    assert sealed["sealed_at"] - sealed["opened_at"] >= TIMEOUT_S

    # Every sealed batch gets its manifest, written by DuckDB into the object store.
    batches = wait_for("five manifests", lambda: [b for b in admin_batches(gw) if b["manifest_key"]]
                       if all(b["manifest_key"] for b in admin_batches(gw)) else None)
    seen: set[str] = set()
    for batch in batches:
        assert batch["manifest_key"] == f"batches/{batch['batch_id']}/manifest.parquet"
        stored = stored_manifest(gw, batch["batch_id"])
        assert stored is not None
        with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {SYNC_TOKEN}"}) as client:
            resp = client.get(f"/api/sync/batches/{batch['batch_id']}/manifest.parquet")
        assert resp.status_code == 200 and resp.content == stored
        assert resp.headers["x-content-xxh3-128"] == xxhash.xxh3_128_hexdigest(stored)
        types, rows = read_manifest(stored, tmp_path)
        assert len(rows) == batch["image_count"]
        assert types == ["VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "BIGINT", "VARCHAR", "VARCHAR", "VARCHAR",
                         "VARCHAR", "TIMESTAMP WITH TIME ZONE", "VARCHAR", "VARCHAR", "VARCHAR",
                         "VARCHAR"]  # the last: near_duplicate_of
        for row in rows:
            r = dict(zip(COLUMNS, row, strict=True))
            image, filename, metadata = sent[r["image_id"]]
            assert r["batch_id"] == batch["batch_id"] and r["device_id"] == device_id
            assert r["xxh3_128"] == xxhash.xxh3_128_hexdigest(image)
            assert (r["filename"], r["size"], r["content_type"]) == (filename, len(image), "image/png")
            assert r["metadata"] == metadata  # the JSON text exactly as sent
            assert r["storage_key"].startswith("raw-data/") and r["storage_key"].endswith(filename)
            assert abs(r["received_at"].timestamp() - time.time()) < 600
            assert r["cloud_image_id"] is None and r["cloud_batch_id"] is None and r["cloud_storage_key"] is None
            assert r["near_duplicate_of"] is None  # 1x1 PNGs: too small to fingerprint
            seen.add(r["image_id"])
    assert seen == set(sent)

    # Not yet forwarded: a sync job may not ack it.
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {SYNC_TOKEN}"}) as client:
        resp = client.post(f"/api/sync/batches/{last['batch_id']}/ack")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "CONFLICT"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_cli_running_and_stopped(
    backend: str, start_gateway: Callable[..., GatewayProcess], backend_env: Callable[[str], dict[str, str]],
) -> None:
    # timeout_s 30: the sealer then looks every 1.5 s, and no batch here lives that long unsealed by hand.
    gw = start_gateway(backend_env(backend) | {"GATEWAY_BATCHES_MAX_IMAGES": "3", "GATEWAY_BATCHES_TIMEOUT_S": "30"})
    _, key = gw.add_device("cam-cli")
    ids = [upload(gw, key, png_bytes(f"cli {n}".encode()), filename=f"c{n}.png",
                  content_type="image/png").json()["data"] for n in range(4)]
    full, open_batch = ids[0]["batch_id"], ids[3]["batch_id"]

    listed = json.loads(gw.cli("batches", "list", "--state", "collecting", "--json").stdout)
    assert [b["batch_id"] for b in listed] == [open_batch]
    out = gw.cli("batches", "seal", open_batch).stdout
    assert f"batch {open_batch}: sealed (1 image(s))" in out
    again = json.loads(gw.cli("batches", "seal", open_batch, "--json").stdout)
    assert again["sealed_now"] is False and again["batch"]["state"] in ("sealed", "forwarded")

    table = gw.cli("batches", "show", full).stdout
    assert all(i["image_id"] in table for i in ids[:3]) and "XXH3-128" in table
    with gw.admin() as client:
        shown = client.get(f"/api/admin/batches/{full}").json()["data"]
    assert [r["image_id"] for r in shown["manifest"]] == [i["image_id"] for i in ids[:3]]
    missing = gw.cli("batches", "show", "batch_nope", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    # Forwarding is off: sealed batches become drainable at once, and manifests follow the seal.
    wait_for("both batches forwarded with manifests", lambda: all(
        b["state"] == "forwarded" and b["manifest_key"] for b in admin_batches(gw)))

    assert gw.stop() == 0
    offline = gw.cli("batches", "list").stdout.splitlines()
    assert offline[0].split()[:3] == ["BATCH", "DEVICE", "STATE"] and len(offline) == 3
    assert {line.split()[0] for line in offline[1:]} == {full, open_batch}
    assert all(line.split()[2] == "forwarded" for line in offline[1:])


def test_manifest_writer_rewrites_on_cloud_ids_and_survives_store_errors(tmp_path: Path) -> None:
    """In-process with a real DuckDB file: the start-up scan, a rewrite asked for from another
    thread once cloud ids are known, and a store that fails for a while."""
    catalog = Catalog(tmp_path / "catalog.duckdb")
    catalog.open()
    objects = tmp_path / "objects"
    objects.write_text("not a folder: every write fails until this goes")
    writer = ManifestWriter(catalog, FolderStore(objects), tmp_path, Metrics(), time.time, retry_s=0.2)
    now = time.time()

    def seed(conn: duckdb.DuckDBPyConnection) -> None:
        for batch_id, state in (("batch_a", "sealed"), ("batch_b", "collecting")):
            conn.execute("INSERT INTO batches (batch_id, device_id, state, opened_at, image_count) "
                         "VALUES (?, 'dev_1', ?, ?, 3)", [batch_id, state, now])
            for n in range(3):
                conn.execute(
                    "INSERT INTO images (image_id, seq, batch_id, device_id, filename, content_type, size, "
                    "xxh3_128, storage_key, metadata, received_at) VALUES (?, ?, ?, 'dev_1', ?, 'image/png', 10, "
                    "?, ?, ?, ?)",
                    [f"img_{batch_id}_{n}", n, batch_id, f"f{n}.png", f"{n:032x}", f"raw-data/{n}", b'{"n": 1}', now],
                )

    catalog.write_sync(seed)

    def manifest_state() -> tuple[Any, ...] | None:
        return catalog.read_sync(lambda c: c.execute(
            "SELECT manifest_key, manifest_cloud_ids FROM batches WHERE batch_id = 'batch_a'").fetchone())

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run)
            await anyio.sleep(1.0)  # several failed attempts: the store is unusable
            assert manifest_state() == (None, None)
            objects.unlink()
            with anyio.fail_after(10):
                while manifest_state() != ("batches/batch_a/manifest.parquet", 0):
                    await anyio.sleep(0.05)
            catalog.write_sync(lambda c: c.execute(
                "UPDATE images SET cloud_image_id = 'c_' || image_id, cloud_batch_id = 'cb_1', "
                "cloud_storage_key = 'cloud/' || image_id WHERE batch_id = 'batch_a'"))
            assert catalog.read_sync(stale_manifests) == ["batch_a"]
            await anyio.to_thread.run_sync(writer.request, "batch_a")  # as the forwarder would, any thread
            writer.request("batch_b")  # still collecting: nothing to write
            with anyio.fail_after(10):
                while manifest_state() != ("batches/batch_a/manifest.parquet", 3):
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

    try:
        anyio.run(scenario)
        with duckdb.connect() as db:
            rows = db.execute("SELECT image_id, cloud_image_id, cloud_batch_id, cloud_storage_key, metadata FROM "
                              "read_parquet(?) ORDER BY image_id",
                              [str(objects / "batches/batch_a/manifest.parquet")]).fetchall()
        assert rows == [(f"img_batch_a_{n}", f"c_img_batch_a_{n}", "cb_1", f"cloud/img_batch_a_{n}", '{"n": 1}')
                        for n in range(3)]
        assert not (objects / "batches/batch_b").exists()
        assert catalog.read_sync(stale_manifests) == []
        assert list((tmp_path / "manifests.tmp").glob("*")) == []
        assert (writer.metrics.registry.get_sample_value(
            "acusight_gateway_manifest_writes_total", {"outcome": "failed"}) or 0) >= 2
    finally:
        catalog.close()
