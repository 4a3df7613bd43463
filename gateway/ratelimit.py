"""Token buckets in memory: the per-device upload rate limit, and (one bucket, gateway-wide) the
look-ups of unknown device keys at the cloud."""

from __future__ import annotations

import math
from collections.abc import Callable

from gateway.errors import RateLimited


class DeviceRateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float], what: str = "uploads",
                 message: str | None = None) -> None:
        self.what = what  # what is counted, for the refusal's details
        self.message = message  # the refusal's message; None: RateLimited's own
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def take(self, device_id: str) -> None:
        """Spend one upload for the device, or raise `RateLimited` with the wait in Retry-After."""
        if not self.enabled:
            return
        now = self.clock()
        tokens, at = self._buckets.get(device_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.refill_per_s)
        if tokens < 1.0:
            self._buckets[device_id] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.refill_per_s)
            raise RateLimited(self.message, details=f"limit is {int(self.capacity)} {self.what} per minute",
                              retry_after=max(1, wait))
        self._buckets[device_id] = (tokens - 1.0, now)
