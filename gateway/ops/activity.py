"""Recent activity kept in memory for the status page: per-minute throughput and recent errors.

Both are bounded and lost on restart by design: the catalog holds the durable figures, these
only answer "is data flowing right now?" and "what went wrong lately?".
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable

import msgspec

MINUTES_KEPT = 60
ERRORS_KEPT = 50
# Belt and braces: nothing recorded here should hold a key, but a message quoting one is masked.
_KEY_LIKE = re.compile(r"adk_[0-9A-Za-z]{6,}")


class MinuteCounts(msgspec.Struct, kw_only=True):
    """What happened in one wall-clock minute (`minute` is unix seconds at its start)."""

    minute: int
    accepted: int = 0
    accepted_bytes: int = 0
    delivered: int = 0
    delivered_bytes: int = 0


class Throughput:
    """Accepted and delivered counts and bytes per minute, for the last `MINUTES_KEPT` minutes.

    The upload handler calls `record_accepted`; the forwarder calls `record_delivered` once per
    image the cloud took (2xx or 409). Both are cheap and thread-safe.
    """

    def __init__(self, clock: Callable[[], float], minutes: int = MINUTES_KEPT) -> None:
        self.clock = clock
        self.started_at = clock()
        self._minutes: deque[MinuteCounts] = deque(maxlen=minutes)
        self._lock = threading.Lock()

    def _current(self) -> MinuteCounts:
        minute = int(self.clock() // 60) * 60
        if not self._minutes or self._minutes[-1].minute != minute:
            self._minutes.append(MinuteCounts(minute=minute))
        return self._minutes[-1]

    def record_accepted(self, size: int) -> None:
        with self._lock:
            counts = self._current()
            counts.accepted += 1
            counts.accepted_bytes += size

    def record_delivered(self, size: int) -> None:
        with self._lock:
            counts = self._current()
            counts.delivered += 1
            counts.delivered_bytes += size

    def last_minutes(self, n: int) -> list[MinuteCounts]:
        """The last `n` minutes, oldest first, the current (partial) minute last; quiet minutes are zeros."""
        now_minute = int(self.clock() // 60) * 60
        with self._lock:
            by_minute = {m.minute: m for m in self._minutes}
        return [
            msgspec.structs.replace(by_minute[t]) if t in by_minute else MinuteCounts(minute=t)
            for t in range(now_minute - 60 * (n - 1), now_minute + 1, 60)
        ]

    def delivery_rate(self, window_s: float = 300.0) -> tuple[float, float]:
        """Delivered (images/s, bytes/s) over the last `window_s` seconds (or since start, if sooner)."""
        now = self.clock()
        since = max(now - window_s, self.started_at)
        span = max(now - since, 1.0)
        with self._lock:
            # A minute bucket counts when it overlaps the window; close enough for an estimate.
            recent = [m for m in self._minutes if m.minute + 60 > since]
        images = sum(m.delivered for m in recent)
        size = sum(m.delivered_bytes for m in recent)
        return images / span, size / span

    def eta_s(self, backlog_count: int, backlog_bytes: int, window_s: float = 300.0) -> float | None:
        """Seconds to deliver the backlog at the recent delivery rate; 0 when empty, None when nothing moves."""
        if backlog_count <= 0:
            return 0.0
        images_per_s, bytes_per_s = self.delivery_rate(window_s)
        if backlog_bytes > 0 and bytes_per_s > 0:
            return backlog_bytes / bytes_per_s
        if images_per_s > 0:
            return backlog_count / images_per_s
        return None


class ErrorEntry(msgspec.Struct, kw_only=True):
    """One error response, as the status page lists it (no headers, no query string, no body)."""

    at: float
    method: str
    path: str
    status: int
    code: str = ""
    message: str = ""
    request_id: str = ""
    client: str = ""


class RecentErrors:
    """The last `ERRORS_KEPT` error responses (status >= 400), newest last."""

    def __init__(self, size: int = ERRORS_KEPT) -> None:
        self._entries: deque[ErrorEntry] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, entry: ErrorEntry) -> None:
        entry.message = _KEY_LIKE.sub("adk_…", entry.message)[:200]
        entry.path = _KEY_LIKE.sub("adk_…", entry.path)[:200]
        with self._lock:
            self._entries.append(entry)

    def latest(self, n: int = 20) -> list[ErrorEntry]:
        """The newest `n` entries, newest first."""
        with self._lock:
            return list(reversed(self._entries))[:n]
