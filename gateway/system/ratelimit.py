"""Rate limits as token buckets in memory, one per key: uploads per device, provisioning per client
address, and (one bucket, gateway-wide) the look-ups of unknown device keys at the cloud."""

from __future__ import annotations

import math
from collections.abc import Callable

from gateway.errors import RateLimited

MAX_BUCKETS = 100_000  # past this many keys, buckets that have refilled completely are forgotten


class DeviceRateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float], what: str = "uploads",
                 message: str | None = None) -> None:
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self.what = what
        self.message = message
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def take(self, device_id: str) -> None:
        """Spend one request of `device_id` (or any key), or raise `RateLimited` with the wait in Retry-After."""
        if not self.enabled:
            return
        now = self.clock()
        if len(self._buckets) >= MAX_BUCKETS:
            self._forget_full(now)
        tokens, at = self._buckets.get(device_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.refill_per_s)
        if tokens < 1.0:
            self._buckets[device_id] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.refill_per_s)
            raise RateLimited(self.message, details=f"limit is {int(self.capacity)} {self.what} per minute",
                              retry_after=max(1, wait))
        self._buckets[device_id] = (tokens - 1.0, now)

    def _forget_full(self, now: float) -> None:
        full_after = self.capacity / self.refill_per_s
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
