"""The gateway's state in figures, for `gateway status`, `/metrics` and the status page."""

from __future__ import annotations

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
    delivered_count: int = 0
    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    connectivity: str = "off"
    eta_s: float | None = None
    disk_free_bytes: int | None = None
    catalog_bytes: int = 0
    startup: dict[str, object] = msgspec.field(default_factory=dict)


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
        delivered_count=int(delivered[0]),
        last_success_at=delivered[3],
        last_error=err[0] if err else None,
        last_error_at=err[1] if err else None,
    )
