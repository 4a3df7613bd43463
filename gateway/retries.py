"""How each kind of destination is retried, declared once: the cloud, the S3 store, the catalog writer
and the gateway as its own clients (the CLI, the drain job) see it.

The cloud's delays and attempts are settings (`[forward] backoff_base_s`, `backoff_max_s`,
`max_attempts`; `cloud_policy`), with full jitter so many entries do not retry in step; the catalog
writer is told again, without end, while it refuses; the store and the gateway's own clients have
short fixed schedules: a store that fails thrice in 0.3 s is answered as unavailable, and the drain
job gives a restarting gateway about 4 s before it gives up.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import ForwardSettings

SERVER_ERRORS = frozenset(range(500, 1000))  # 5xx, and any odd status above


def backoff_delay(attempts: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(max_s, base_s * 2**(attempts-1))] for the n-th failure."""
    ceiling = min(max_s, base_s * (2.0 ** min(max(attempts - 1, 0), 60)))
    return ceiling * rand()


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a destination again: which answers, how often, how long apart."""

    attempts: int  # tries in all, the first included; 0: no limit
    first_delay_s: float  # after the first failure; doubles per failure
    max_delay_s: float
    retry_statuses: frozenset[int]  # HTTP answers worth another try (transport failures always are)
    jitter: bool = False  # full jitter (uniform in [0, delay]) instead of the delay itself

    def retries(self, status: int) -> bool:
        """Whether an answer with `status` is worth another try."""
        return status in self.retry_statuses

    def delay_s(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """How long to wait after the `failures`-th failure in a row (1 for the first)."""
        if self.jitter:
            return backoff_delay(failures, self.first_delay_s, self.max_delay_s, rand)
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** min(max(failures - 1, 0), 60))

    def gives_up_after(self, failures: int) -> bool:
        """Whether `failures` failed tries use up the attempts."""
        return self.attempts > 0 and failures >= self.attempts


# The cloud (SPEC §4): 408, 429 and any 5xx are retried; other 4xx are rejected for good. The
# numbers here are the settings' defaults; `cloud_policy` puts in the configured ones.
CLOUD = RetryPolicy(attempts=0, first_delay_s=1.0, max_delay_s=300.0,
                    retry_statuses=frozenset({408, 429}) | SERVER_ERRORS, jitter=True)
# The S3 store: a PUT of the same bytes under the same key is idempotent; a gateway/proxy error
# is tried twice more, 0.1 s and 0.2 s later. A read timeout is not retried (see storage.s3).
OBJECT_STORE = RetryPolicy(attempts=3, first_delay_s=0.1, max_delay_s=0.2, retry_statuses=frozenset({502, 503, 504}))
# The catalog writer, as the ingestor's words to it are sent again while it refuses them (a full disk,
# DuckDB refusing its journal): from 1 s, doubling to 30 s, until the catalog closes.
CATALOG_WRITER = RetryPolicy(attempts=0, first_delay_s=1.0, max_delay_s=30.0, retry_statuses=frozenset())
# The gateway's admin and sync APIs, as the drain job calls them (every call there is idempotent).
GATEWAY = RetryPolicy(attempts=4, first_delay_s=0.5, max_delay_s=10.0,
                      retry_statuses=frozenset({408, 429}) | SERVER_ERRORS)


def cloud_policy(forward: ForwardSettings) -> RetryPolicy:
    """`CLOUD` with the configured attempts and delays (`Settings.forward`)."""
    return replace(CLOUD, attempts=forward.max_attempts, first_delay_s=forward.backoff_base_s,
                   max_delay_s=forward.backoff_max_s)
