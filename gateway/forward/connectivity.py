"""One warning line per connectivity change of the forwarder: offline (with the reason and the
backlog) and online again (with how long it was down), so the log tells an outage's story."""

from __future__ import annotations

import logging

from gateway.catalog import Catalog, Conn
from gateway.humanize import human_age, human_bytes

log = logging.getLogger("gateway.forward")


def _backlog(conn: Conn) -> tuple[int, int]:
    row = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox WHERE state = 'pending'").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def went_offline(catalog: Catalog, url: str, reason: str) -> None:
    count, size = await catalog.read(_backlog)
    log.warning("cloud offline: %s unreachable (%s); %d image(s) (%s) wait in the outbox, nothing is lost; "
                "probing until it answers", url, reason, count, human_bytes(size))


async def came_back(catalog: Catalog, url: str, offline_for_s: float | None) -> None:
    count, size = await catalog.read(_backlog)
    log.warning("cloud online again: %s answers after %s offline; sending %d waiting image(s) (%s)",
                url, human_age(offline_for_s), count, human_bytes(size))
