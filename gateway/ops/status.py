"""The gateway's state in figures, for `gateway status`, `/metrics` and the status page."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.catalog import Conn


class StatusReport(msgspec.Struct, kw_only=True):
    images: int = 0
    image_bytes: int = 0
    devices: int = 0
    batches: dict[str, int] = msgspec.field(default_factory=dict)
    backlog_count: int = 0
    backlog_bytes: int = 0
    held_count: int = 0
    oldest_pending_at: float | None = None
    oldest_pending_age_s: float | None = None
    dead_count: int = 0
    key_unreadable_count: int = 0  # dead letters whose device key does not open under the key secret
    journal_quarantined: int = 0  # journal records DuckDB refused, set aside (`gateway journal quarantine`)
    skipped_count: int = 0  # near-duplicates held at the edge (outbox `skipped`)
    skipped_bytes: int = 0
    delivered_count: int = 0
    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    connectivity: str = "off"
    eta_s: float | None = None
    disk_free_bytes: int | None = None
    catalog_bytes: int = 0
    startup: dict[str, object] = msgspec.field(default_factory=dict)
    uplink: dict[str, Any] = msgspec.field(default_factory=dict)  # classes and window (UplinkPlan.report)


def read_status(conn: Conn, now: float) -> StatusReport:
    """Catalog figures (a read op; cheap enough to run on every scrape)."""
    images, image_bytes = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM images").fetchone() or (0, 0)
    devices = (conn.execute("SELECT count(*) FROM devices").fetchone() or (0,))[0]
    batches = dict(conn.execute("SELECT state, count(*) FROM batches GROUP BY state").fetchall())
    outbox = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT state, count(*), coalesce(sum(size), 0), min(created_at), max(delivered_at) "
            "FROM outbox GROUP BY state"
        ).fetchall()
    }
    pending = outbox.get("pending", (0, 0, None, None))
    held = outbox.get("held", (0, 0, None, None))
    delivered = outbox.get("delivered", (0, 0, None, None))
    oldest = min((t for t in (pending[2], held[2]) if t is not None), default=None)
    (unreadable,) = conn.execute(
        "SELECT count(*) FROM outbox WHERE state = 'dead' AND starts_with(last_error, 'KEY_UNREADABLE')"
    ).fetchone() or (0,)
    err = conn.execute(
        "SELECT last_error, next_attempt_at FROM outbox WHERE last_error IS NOT NULL "
        "ORDER BY next_attempt_at DESC LIMIT 1"
    ).fetchone()
    return StatusReport(
        images=int(images),
        image_bytes=int(image_bytes),
        devices=int(devices),
        batches={str(k): int(v) for k, v in batches.items()},
        backlog_count=int(pending[0]) + int(held[0]),
        backlog_bytes=int(pending[1]) + int(held[1]),
        held_count=int(held[0]),
        oldest_pending_at=oldest,
        oldest_pending_age_s=None if oldest is None else max(0.0, now - oldest),
        dead_count=int(outbox.get("dead", (0,))[0]),
        key_unreadable_count=int(unreadable),
        skipped_count=int(outbox.get("skipped", (0,))[0]),
        skipped_bytes=int(outbox.get("skipped", (0, 0))[1]),
        delivered_count=int(delivered[0]),
        last_success_at=delivered[3],
        last_error=err[0] if err else None,
        last_error_at=err[1] if err else None,
    )


# -- detail for the status page (read ops; each is bounded by LIMIT or by the device count) --------


class DeviceActivity(msgspec.Struct, kw_only=True):
    device_id: str
    name: str
    status: str
    revoked: bool
    last_seen_at: float | None
    images: int
    image_bytes: int
    last_upload_at: float | None
    model_id: str | None = None  # as the last heartbeat gave them
    ip_address: str | None = None
    pending_requests: int = 0


class RecentUpload(msgspec.Struct, kw_only=True):
    image_id: str
    device_id: str
    filename: str
    size: int
    received_at: float
    state: str | None  # outbox state: pending | held | delivered | dead


class DeadLetter(msgspec.Struct, kw_only=True):
    image_id: str
    device_id: str
    filename: str | None
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: float


def device_activity(conn: Conn) -> list[DeviceActivity]:
    """Every device with its image count, bytes and last upload, most recently seen first."""
    rows = conn.execute(
        "SELECT d.device_id, d.name, d.status, d.revoked, d.last_seen_at, "
        "coalesce(i.n, 0), coalesce(i.bytes, 0), i.last_at, d.last_model_id, d.last_ip, "
        "coalesce(json_array_length(d.pending_requests), 0) "
        "FROM devices d LEFT JOIN (SELECT device_id, count(*) AS n, sum(size) AS bytes, max(received_at) AS last_at "
        "FROM images GROUP BY device_id) i USING (device_id) "
        "ORDER BY greatest(coalesce(d.last_seen_at, 0), coalesce(i.last_at, 0)) DESC, d.name"
    ).fetchall()
    return [
        DeviceActivity(device_id=r[0], name=r[1], status=r[2], revoked=bool(r[3]), last_seen_at=r[4],
                       images=int(r[5]), image_bytes=int(r[6]), last_upload_at=r[7], model_id=r[8],
                       ip_address=r[9], pending_requests=int(r[10]))
        for r in rows
    ]


def _by_id(conn: Conn, sql: str, ids: list[str]) -> dict[str, Any]:
    """`sql` (with `{ids}` for the placeholders) run for a few ids: a primary-key look-up each,
    where a join would scan the whole table (ten times slower at 2 M rows; docs/design.md)."""
    if not ids:
        return {}
    rows = conn.execute(sql.format(ids=", ".join("?" * len(ids))), ids).fetchall()
    return {r[0]: r[1] for r in rows}


def recent_uploads(conn: Conn, limit: int = 20) -> list[RecentUpload]:
    """The newest `limit` images with their delivery state."""
    rows = conn.execute(
        "SELECT image_id, device_id, filename, size, received_at FROM images ORDER BY seq DESC LIMIT ?", [limit]
    ).fetchall()
    states = _by_id(conn, "SELECT image_id, state FROM outbox WHERE image_id IN ({ids})", [r[0] for r in rows])
    return [RecentUpload(image_id=r[0], device_id=r[1], filename=r[2], size=int(r[3]), received_at=r[4],
                         state=states.get(r[0])) for r in rows]


def dead_letters(conn: Conn, limit: int = 20) -> list[DeadLetter]:
    """The newest `limit` dead-lettered outbox entries, with the status and error the cloud gave."""
    rows = conn.execute(
        "SELECT image_id, device_id, attempts, last_status, last_error, created_at FROM outbox "
        "WHERE state = 'dead' ORDER BY seq DESC LIMIT ?",
        [limit],
    ).fetchall()
    names = _by_id(conn, "SELECT image_id, filename FROM images WHERE image_id IN ({ids})", [r[0] for r in rows])
    return [DeadLetter(image_id=r[0], device_id=r[1], filename=names.get(r[0]), attempts=int(r[2]),
                       last_status=r[3], last_error=r[4], created_at=r[5]) for r in rows]
