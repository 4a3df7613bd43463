"""The one token bucket, and the rate limits built on it.

`TokenBucket` is used as-is by the forwarder's bandwidth cap (`forward.backoff.ByteBucket`) and
the drain job's `--limit-rate`; `DeviceRateLimiter` keeps one per key in memory: uploads per
device, provisioning per client address, and (one bucket, gateway-wide) the look-ups of unknown
device keys at the cloud.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from gateway.errors import RateLimited

MAX_BUCKETS = 100_000  # past this many keys, buckets that have refilled completely are forgotten


class TokenBucket:
    """`rate` tokens a second up to `burst`; `rate` <= 0 means unlimited.

    `take` may go into debt and says how long to wait off, so concurrent takers queue in
    virtual time and the long-run rate is exactly `rate`; `try_take` takes only what is there.
    `full`: start with `burst` tokens (else none); `shared`: guarded by a lock for threads."""

    __slots__ = ("_lock", "burst", "clock", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float], *, full: bool = True,
                 shared: bool = False) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst if full else 0.0
        self.updated = clock()
        self._lock = threading.Lock() if shared else None

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, n: float) -> float:
        """Take `n` tokens, into debt if need be; returns how long to wait before using them."""
        if self.unlimited:
            return 0.0
        if self._lock is None:
            return self._take(n)
        with self._lock:
            return self._take(n)

    def _take(self, n: float) -> float:
        self._refill()
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self, n: float = 1.0) -> float:
        """Take `n` tokens if there are that many (returns 0); else take nothing and return the wait."""
        if self.unlimited:
            return 0.0
        if self._lock is None:
            return self._try_take(n)
        with self._lock:
            return self._try_take(n)

    def _try_take(self, n: float) -> float:
        self._refill()
        if self.tokens < n:
            return (n - self.tokens) / self.rate
        self.tokens -= n
        return 0.0

    def idle_for(self, now: float) -> float:
        """Seconds since the bucket was last used."""
        return now - self.updated


class DeviceRateLimiter:
    """A bucket of `per_minute` requests per key; a refusal raises `RateLimited` with Retry-After."""

    def __init__(self, per_minute: int, clock: Callable[[], float], what: str = "uploads",
                 message: str | None = None) -> None:
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self.what = what
        self.message = message
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def take(self, device_id: str) -> None:
        """Spend one request of `device_id` (or any key), or raise `RateLimited` with the wait in Retry-After."""
        if not self.enabled:
            return
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(self.clock())
            bucket = self._buckets[device_id] = TokenBucket(self.refill_per_s, self.capacity, self.clock)
        wait = bucket.try_take(1.0)
        if wait > 0:
            raise RateLimited(self.message, details=f"limit is {int(self.capacity)} {self.what} per minute",
                              retry_after=max(1, math.ceil(wait)))

    def _forget_full(self, now: float) -> None:
        full_after = self.capacity / self.refill_per_s
        self._buckets = {k: b for k, b in self._buckets.items() if b.idle_for(now) < full_after}
