"""Catalog figures: dedup check + insert latency with many images already recorded, bytes per
image, and a catalog with many pending outbox rows for the start-up measurement."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import duckdb

from gateway.catalog import Catalog
from gateway.catalog.collecting import NewImage
from gateway.catalog.schema import migrate
from gateway.config import Settings
from gateway.ingest.pipeline import Ingestor
from gateway.ops.metrics import Metrics

CHUNK = 200_000
WARM_UP = 100  # untimed uploads first, as a serving gateway has had


def fill(path: Path, rows: int, state: str, device_id: str = "dev_bench") -> None:
    """Insert `rows` images with their outbox entries (bulk statements, as fast as DuckDB goes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(path))
    migrate(con)
    con.execute("INSERT INTO batches (batch_id, device_id, state, opened_at, image_count) "
                "VALUES ('batch_bench', ?, 'sealed', 1.0, ?)", [device_id, rows])
    done = 0
    while done < rows:
        n = min(CHUNK, rows - done)
        ids = [f"img_{uuid.uuid4()}" for _ in range(n)]
        seqs = list(range(done + 1, done + n + 1))
        hashes = [secrets.token_hex(16) for _ in range(n)]
        con.execute(
            "INSERT INTO images (image_id, seq, batch_id, device_id, filename, content_type, size, xxh3_128, "
            "storage_key, metadata, received_at) SELECT unnest(?), unnest(?), 'batch_bench', ?, 'f.jpg', "
            "'image/jpeg', 102400, unnest(?), 'raw-data/' || unnest(?) || '_f.jpg', NULL, 1.0",
            [ids, seqs, device_id, hashes, [i[4:] for i in ids]],
        )
        con.execute(
            "INSERT INTO outbox (image_id, seq, device_id, size, state, created_at, next_attempt_at) "
            "SELECT unnest(?), unnest(?), ?, 102400, ?, 1.0, 1.0",
            [ids, seqs, device_id, state],
        )
        done += n
    con.execute("CHECKPOINT")
    con.close()


def dedup_latency(workdir: Path, rows: int, samples: int) -> dict[str, Any]:
    """Time the upload path's catalog work through the real `Catalog` and `Ingestor` code, one
    upload at a time: the duplicate check of new bytes (the filter, then the catalog when it says
    "maybe"), the recording (journaled and fsynced, as an upload is acknowledged; the journal's
    batches reach DuckDB meanwhile), and the look-up that finds an already stored image."""
    path = workdir / "catalog.duckdb"
    started = time.perf_counter()
    fill(path, rows, "delivered")
    fill_s = time.perf_counter() - started
    size_bytes = os.path.getsize(path)
    settings = Settings()
    settings.data.dir = str(workdir)
    catalog = Catalog(path)
    catalog.open()
    ingestor = Ingestor(settings, catalog, store=None, metrics=Metrics(), clock=time.time)  # type: ignore[arg-type]

    async def run() -> tuple[list[float], list[float], list[float]]:
        await ingestor.start()
        await ingestor.load_seen_keys()  # as a serving gateway has it
        stored = [r[0] for r in await catalog.read(
            lambda c: c.execute("SELECT xxh3_128 FROM images USING SAMPLE 1000 ROWS").fetchall())]
        checks, inserts, dup_checks = [], [], []
        for i in range(-WARM_UP, samples):  # the first inserts load the index pages: not timed
            digest = secrets.token_hex(16)
            t0 = time.perf_counter()
            found = await ingestor.find_duplicate("dev_bench", digest)
            t1 = time.perf_counter()
            assert found is None
            uid = uuid.uuid4()
            new = NewImage(image_id=f"img_{uid}", device_id="dev_bench", filename=f"f{i}.jpg",
                           content_type="image/jpeg", size=102400, xxh3_128=digest,
                           storage_key=f"raw-data/{uid.hex}_f{i}.jpg", metadata=None, received_at=time.time(),
                           outbox_state="pending", batch_max_images=settings.batches.max_images)
            await asyncio.wrap_future(catalog.submit_upload(new))  # as uploads are acknowledged
            t2 = time.perf_counter()
            if i >= 0:
                checks.append(t1 - t0)
                inserts.append(t2 - t1)
        # Look-ups of stored bytes on their own: a catalog read first moves the journal into DuckDB.
        for i in range(-WARM_UP, samples):
            t3 = time.perf_counter()
            dup = await ingestor.find_duplicate("dev_bench", stored[i % len(stored)])
            t4 = time.perf_counter()
            assert dup is not None
            if i >= 0:
                dup_checks.append(t4 - t3)
        return checks, inserts, dup_checks

    checks, inserts, dup_checks = asyncio.run(run())
    catalog.close()
    both = sorted(c + i for c, i in zip(checks, inserts, strict=True))

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(len(xs) * q))] * 1000, 3)

    return {
        "rows": rows, "fill_s": round(fill_s, 1), "samples": samples, "warm_up": WARM_UP,
        "check_p50_ms": pct(checks, 0.5), "check_p99_ms": pct(checks, 0.99),
        "duplicate_lookup_p50_ms": pct(dup_checks, 0.5), "duplicate_lookup_p99_ms": pct(dup_checks, 0.99),
        "insert_p50_ms": pct(inserts, 0.5), "insert_p99_ms": pct(inserts, 0.99),
        "check_plus_insert_p50_ms": pct(both, 0.5), "check_plus_insert_p99_ms": pct(both, 0.99),
        "catalog_bytes": size_bytes, "bytes_per_image": round(size_bytes / rows, 1),
    }
