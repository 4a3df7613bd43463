"""When to send to the cloud: retry delays, `Retry-After`, and the shared per-destination gate.

Pure logic with an injected clock (tests drive it without sleeping). One `CloudGate` stands for
the cloud as a whole, so one outage is one pause, not N independent retry loops:

    online     --(a retryable failure)---------------------------------> degraded
    degraded   --(a success)------------------------------------------> online
    online/degraded/recovering --(offline_after connection failures in a row)--> offline
    offline    --(a probe gets any HTTP answer)------------------------> recovering
    recovering --(successes double the allowed in-flight count up to the cap)--> online

A `Retry-After`, a 429 or a 503 pauses all sending until the given time and restarts the ramp
at one upload in flight. While offline nothing is sent but probes, spaced by the same backoff (at most `PROBE_MAX_S`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from gateway.retries import backoff_delay
from gateway.system.ratelimit import TokenBucket

__all__ = ["ByteBucket", "CloudGate", "backoff_delay", "parse_retry_after"]

ONLINE, DEGRADED, OFFLINE, RECOVERING = "online", "degraded", "offline", "recovering"
# While offline, probes are at most this far apart (before jitter), whatever forward.backoff_max_s.
PROBE_MAX_S = 10.0
STATES = (ONLINE, DEGRADED, OFFLINE, RECOVERING)
# Statuses that mean "the cloud as a whole wants less traffic": they pause every upload.
PAUSING_STATUSES = frozenset({429, 503})


def parse_retry_after(value: str | None, now_unix: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_unix)


class CloudGate:
    """Connectivity state and admission control for one cloud destination (`clock`: monotonic)."""

    def __init__(
        self,
        concurrency: int,
        base_s: float,
        max_s: float,
        clock: Callable[[], float],
        offline_after: int = 3,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.concurrency = concurrency
        self.base_s = base_s
        self.max_s = max_s
        self.clock = clock
        self.offline_after = offline_after
        self.rand = rand
        self.state = ONLINE
        self.limit = concurrency  # uploads allowed in flight now (the ramp)
        self.paused_until = 0.0
        self.connection_failures = 0  # in a row
        self.failures = 0  # retryable failures in a row, of any kind
        self.probes_failed = 0
        self.next_probe_at = 0.0

    # -- questions ---------------------------------------------------------------------------

    def may_send(self, in_flight: int) -> bool:
        """Whether one more upload may start now."""
        if self.state == OFFLINE or self.clock() < self.paused_until:
            return False
        return in_flight < self.limit

    def wait_s(self) -> float:
        """How long until the gate may open by itself (0 when open; a probe is due when offline)."""
        now = self.clock()
        if self.state == OFFLINE:
            return max(0.0, self.next_probe_at - now)
        return max(0.0, self.paused_until - now)

    def probe_due(self) -> bool:
        return self.state == OFFLINE and self.clock() >= self.next_probe_at

    @property
    def reachable(self) -> bool:
        """False while the cloud is believed down (callers skip it rather than wait for a timeout)."""
        return self.state != OFFLINE

    # -- outcomes ------------------------------------------------------------------------------

    def on_success(self) -> None:
        self.connection_failures = 0
        self.failures = 0
        if self.state == RECOVERING:
            self.limit = min(self.concurrency, self.limit * 2)
            if self.limit >= self.concurrency:
                self.state = ONLINE
        elif self.state in (DEGRADED, ONLINE):
            self.state = ONLINE
            self.limit = max(self.limit, 1)
            if self.limit < self.concurrency:  # a pause's ramp still climbing
                self.limit = min(self.concurrency, self.limit * 2)

    def on_retryable(self, status: int | None, retry_after_s: float | None, connection_failed: bool = False) -> None:
        """A retryable answer (`status` None: transport error or timeout)."""
        self.failures += 1
        if connection_failed:
            self.connection_failures += 1
            if self.connection_failures >= self.offline_after:
                self._go_offline()
                return
        else:
            self.connection_failures = 0
        if self.state == OFFLINE:
            return
        if retry_after_s is not None or status in PAUSING_STATUSES:
            wait = retry_after_s if retry_after_s is not None else backoff_delay(
                self.failures, self.base_s, self.max_s, self.rand)
            self.paused_until = max(self.paused_until, self.clock() + wait)
            self.limit = 1  # after the pause, one upload tests the water
        if self.state == ONLINE:
            self.state = DEGRADED

    def on_probe(self, answered: bool) -> None:
        """A probe's result: any HTTP answer means the cloud is reachable again."""
        if answered:
            self.state = RECOVERING
            self.limit = 1
            self.connection_failures = 0
            self.probes_failed = 0
            return
        self.probes_failed += 1
        self.next_probe_at = self.clock() + self._probe_delay()

    def _go_offline(self) -> None:
        if self.state != OFFLINE:
            self.state = OFFLINE
            self.probes_failed = 0
            self.next_probe_at = self.clock() + self._probe_delay()
        self.limit = 1

    def _probe_delay(self) -> float:
        # "Equal jitter": probes keep a floor so an outage is never probed in a tight loop, and a
        # ceiling of their own (a probe is one small request) so the cloud's return is seen soon.
        ceiling = min(self.max_s, PROBE_MAX_S, self.base_s * (2.0 ** min(self.probes_failed, 60)))
        return ceiling / 2 + (ceiling / 2) * self.rand()


class ByteBucket(TokenBucket):
    """The forwarder's bandwidth cap: one `TokenBucket` over bytes sent, shared by all uploads (and
    their threads); `rate` 0 means unlimited. The default burst is 64 KiB or 1/20 s of `rate`."""

    __slots__ = ()

    def __init__(self, rate: float, clock: Callable[[], float], burst: float | None = None) -> None:
        super().__init__(rate, burst if burst is not None else max(64 * 1024.0, rate / 20), clock, shared=True)
