"""Batch reads for the admin and sync APIs, and the catalog ops behind `seal` and `ack`.

Batches and manifest rows leave here as plain dicts: times are unix seconds (UTC), metadata is
the JSON text exactly as the device sent it (or None). The state transitions themselves stay in
`gateway.batches.lifecycle`; the ops here only wrap them to tell the caller what changed.
"""

from __future__ import annotations

from typing import Any

from gateway.batches import lifecycle as batches
from gateway.catalog import Conn
from gateway.catalog.collecting import CollectingBatches
from gateway.errors import Conflict, NotFound, ValidationFailed

BATCH_FIELDS = (
    "batch_id", "device_id", "state", "opened_at", "sealed_at", "forwarded_at", "drained_at",
    "image_count", "total_bytes", "manifest_key", "manifest_at",
)
# The manifest row schema, the one definition behind the sync API's JSON rows and the Parquet file.
# metadata: the JSON text exactly as received (validated UTF-8 JSON at upload, so decode() is safe);
# received_at: unix seconds (UTC) in JSON, TIMESTAMP WITH TIME ZONE in Parquet; near_duplicate_of:
# the earlier frame of the device this one nearly repeats (gateway.ingest.neardup), else NULL.
ROW_FIELDS = (
    "image_id", "batch_id", "device_id", "filename", "size", "content_type", "xxh3_128", "storage_key",
    "metadata", "received_at", "cloud_image_id", "cloud_batch_id", "cloud_storage_key", "near_duplicate_of",
)


def manifest_select(parquet: bool = False) -> str:
    """The SELECT of a batch's manifest rows in upload order (one parameter: the batch id);
    `parquet`: received_at as a timestamp, the Parquet file's type."""
    exprs = {"metadata": "decode(metadata)"}
    if parquet:
        exprs["received_at"] = "to_timestamp(received_at)"
    columns = ", ".join(f"{exprs[c]} AS {c}" if c in exprs else c for c in ROW_FIELDS)
    return f"SELECT {columns} FROM images WHERE batch_id = ? ORDER BY seq"
_BATCH_SELECT = f"SELECT {', '.join(BATCH_FIELDS)} FROM batches"
MAX_LIMIT = 1000


def check_page(state: str | None, limit: int, offset: int) -> None:
    if state is not None and state not in batches.STATES:
        raise ValidationFailed("Unknown batch state", f"state must be one of {', '.join(batches.STATES)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailed("Bad limit", f"limit must be in 1..{MAX_LIMIT}")
    if offset < 0:
        raise ValidationFailed("Bad offset", "offset must be 0 or more")


def list_batches(conn: Conn, state: str | None, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """One page of batches, oldest first, and the total matching `state` (None: every state)."""
    where, params = ("WHERE state = ?", [state]) if state else ("", [])
    total = conn.execute(f"SELECT count(*) FROM batches {where}", params).fetchone()
    rows = conn.execute(
        f"{_BATCH_SELECT} {where} ORDER BY opened_at, batch_id LIMIT ? OFFSET ?", [*params, limit, offset]
    ).fetchall()
    page = _count_collecting(conn, [dict(zip(BATCH_FIELDS, r, strict=True)) for r in rows])
    return page, int(total[0]) if total else 0


def read_batch(conn: Conn, batch_id: str) -> dict[str, Any]:
    row = conn.execute(f"{_BATCH_SELECT} WHERE batch_id = ?", [batch_id]).fetchone()
    if row is None:
        raise NotFound("No such batch", batch_id)
    return _count_collecting(conn, [dict(zip(BATCH_FIELDS, row, strict=True))])[0]


def _count_collecting(conn: Conn, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A collecting batch's row gets its counts only when it is sealed (`catalog.collecting.CollectingBatches`);
    until then they are counted from its image rows, which are committed and exact. Only pages
    that hold a collecting batch pay for that count."""
    open_ids = [r["batch_id"] for r in rows if r["state"] == batches.COLLECTING]
    if not open_ids:
        return rows
    counted = dict.fromkeys(open_ids, (0, 0)) | {
        batch_id: (int(n), int(size)) for batch_id, n, size in conn.execute(
            "SELECT batch_id, count(*), sum(size) FROM images WHERE batch_id IN (SELECT unnest(?::VARCHAR[])) "
            "GROUP BY batch_id", [open_ids]).fetchall()
    }
    for r in rows:
        if r["batch_id"] in counted:
            r["image_count"], r["total_bytes"] = counted[r["batch_id"]]
    return rows


def manifest_rows(conn: Conn, batch_id: str) -> list[dict[str, Any]]:
    """The batch's images in upload order: the manifest's rows, as JSON-ready dicts."""
    rows = conn.execute(manifest_select(), [batch_id]).fetchall()
    return [dict(zip(ROW_FIELDS, r, strict=True)) for r in rows]


def read_batch_with_manifest(conn: Conn, batch_id: str) -> dict[str, Any]:
    return {"batch": read_batch(conn, batch_id), "manifest": manifest_rows(conn, batch_id)}


def read_image(conn: Conn, image_id: str) -> dict[str, Any]:
    """What the sync API needs to serve one image's bytes."""
    row = conn.execute(
        "SELECT storage_key, size, content_type, xxh3_128, bytes_removed_at FROM images WHERE image_id = ?",
        [image_id],
    ).fetchone()
    if row is None:
        raise NotFound("No such image", image_id)
    if row[4] is not None:
        raise NotFound("Image bytes were removed from this gateway", "removed by the retention setting")
    return {"storage_key": row[0], "size": int(row[1]), "content_type": row[2], "xxh3_128": row[3]}


def seal_by_hand(conn: Conn, collecting: CollectingBatches, batch_id: str,
                 now: float) -> tuple[dict[str, Any], bool]:
    """`batches seal ID`: the batch afterwards, and whether this call sealed it.

    Sealing a batch that is already sealed (or later) changes nothing and is not an error. A batch
    one of whose uploads is still being stored is sealed as soon as that upload is (it is
    `collecting` in the answer, and takes no more uploads)."""
    before = read_batch(conn, batch_id)
    after = collecting.seal(conn, batch_id, now)
    return read_batch(conn, batch_id), before["state"] == batches.COLLECTING and after == "sealed"


def ack(conn: Conn, batch_id: str, now: float) -> tuple[dict[str, Any], bool]:
    """A sync job acked the batch: `forwarded` becomes `drained`. Returns the batch and whether
    this ack drained it; acking a drained batch again changes nothing (same answer).

    A batch not yet forwarded (collecting, or sealed with images still on their way to the
    cloud) is a `Conflict`: it is not drainable, and acking it must not lose the forwarding."""
    before = read_batch(conn, batch_id)
    if before["state"] in (batches.COLLECTING, batches.SEALED):
        raise Conflict(
            "Batch is not drainable yet", f"state is {before['state']}; only forwarded batches can be acked"
        )
    batches.mark_drained(conn, batch_id, now)
    return read_batch(conn, batch_id), before["state"] == batches.FORWARDED
