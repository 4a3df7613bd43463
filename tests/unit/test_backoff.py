"""Retry delays, Retry-After parsing, the shared cloud gate and the byte bucket, on a fake clock."""

from __future__ import annotations

import email.utils
import random

import pytest

from gateway.forward.backoff import (
    DEGRADED,
    OFFLINE,
    ONLINE,
    PROBE_MAX_S,
    RECOVERING,
    ByteBucket,
    CloudGate,
    backoff_delay,
    parse_retry_after,
)
from gateway.system.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_full_jitter_stays_within_the_doubling_ceiling() -> None:
    rng = random.Random(7)
    for attempts, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (9, 100.0), (400, 100.0)]:
        samples = [backoff_delay(attempts, 1.0, 100.0, rng.random) for _ in range(500)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.9  # full jitter spreads over the whole range
        assert min(samples) < ceiling * 0.1
    assert backoff_delay(3, 0.5, 10.0, lambda: 1.0) == 2.0
    assert backoff_delay(0, 0.5, 10.0, lambda: 1.0) == 0.5


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("3", 0.0) == 3.0
    assert parse_retry_after(" 120 ", 0.0) == 120.0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(42.0, abs=1.0)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after(past, now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2020"):
        assert parse_retry_after(bad, now) is None


def test_retry_after_pauses_everyone_and_restarts_with_one_in_flight() -> None:
    clock = Clock()
    gate = CloudGate(concurrency=8, base_s=0.5, max_s=30.0, clock=clock)
    assert gate.state == ONLINE and gate.may_send(7) and not gate.may_send(8)
    gate.on_retryable(503, 3.0)
    assert gate.state == DEGRADED
    assert not gate.may_send(0)  # the pause is for all uploads, not only the one that failed
    assert gate.wait_s() == pytest.approx(3.0)
    clock.now += 2.9
    assert not gate.may_send(0)
    clock.now += 0.2
    assert gate.may_send(0) and not gate.may_send(1)  # one upload tests the water
    gate.on_success()
    assert gate.state == ONLINE and gate.may_send(1) and not gate.may_send(2)
    gate.on_success()
    gate.on_success()
    assert gate.limit == 8


def test_a_later_shorter_retry_after_does_not_shorten_the_pause() -> None:
    clock = Clock()
    gate = CloudGate(concurrency=4, base_s=0.5, max_s=30.0, clock=clock)
    gate.on_retryable(429, 10.0)
    gate.on_retryable(429, 1.0)
    assert gate.wait_s() == pytest.approx(10.0)


def test_429_without_retry_after_pauses_by_backoff_but_500_does_not_pause() -> None:
    clock = Clock()
    gate = CloudGate(concurrency=4, base_s=1.0, max_s=30.0, clock=clock, rand=lambda: 1.0)
    gate.on_retryable(500, None)
    assert gate.may_send(0) and gate.state == DEGRADED  # per-entry backoff only
    gate.on_retryable(429, None)
    assert not gate.may_send(0)
    assert gate.wait_s() == pytest.approx(2.0)  # second failure in a row: base * 2


def test_offline_after_repeated_connection_failures_then_probe_and_ramp() -> None:
    clock = Clock()
    gate = CloudGate(concurrency=8, base_s=1.0, max_s=16.0, clock=clock, offline_after=3, rand=lambda: 1.0)
    gate.on_retryable(None, None, connection_failed=True)
    gate.on_retryable(None, None, connection_failed=True)
    assert gate.state == DEGRADED and gate.may_send(0)
    gate.on_retryable(None, None, connection_failed=True)
    assert gate.state == OFFLINE and not gate.reachable
    assert not gate.may_send(0)
    assert not gate.probe_due()
    delays = []
    for _ in range(7):
        wait = gate.wait_s()
        delays.append(wait)
        clock.now += wait
        assert gate.probe_due()
        gate.on_probe(False)
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]  # probes back off, capped at PROBE_MAX_S
    clock.now += gate.wait_s()
    gate.on_probe(True)
    assert gate.state == RECOVERING
    allowed = []
    for _ in range(4):
        allowed.append(gate.limit)
        assert gate.may_send(gate.limit - 1) and not gate.may_send(gate.limit)
        gate.on_success()
    assert allowed == [1, 2, 4, 8]
    assert gate.state == ONLINE


def test_probes_of_a_long_outage_stay_frequent_whatever_backoff_max_s() -> None:
    """A site admin waited about 40 s (up to backoff_max_s, 300 s by default) for the gateway to
    notice the cloud's return; a probe is one small request, so probes keep their own ceiling."""
    clock = Clock()
    gate = CloudGate(concurrency=8, base_s=1.0, max_s=300.0, clock=clock, offline_after=1, rand=lambda: 1.0)
    gate.on_retryable(None, None, connection_failed=True)
    delays = []
    for _ in range(12):
        wait = gate.wait_s()
        delays.append(wait)
        clock.now += wait
        gate.on_probe(False)
    assert max(delays) == PROBE_MAX_S == 10.0


def test_probe_delays_are_jittered_but_never_zero() -> None:
    clock = Clock()
    rng = random.Random(3)
    gate = CloudGate(concurrency=2, base_s=2.0, max_s=60.0, clock=clock, offline_after=1, rand=rng.random)
    gate.on_retryable(None, None, connection_failed=True)
    assert 1.0 <= gate.wait_s() <= 2.0


def test_other_answers_reset_the_connection_failure_count() -> None:
    clock = Clock()
    gate = CloudGate(concurrency=2, base_s=1.0, max_s=8.0, clock=clock, offline_after=3)
    for _ in range(5):
        gate.on_retryable(None, None, connection_failed=True)
        gate.on_retryable(None, None, connection_failed=True)
        gate.on_retryable(502, None)  # the cloud answered: not an outage of the link
    assert gate.state == DEGRADED


def test_byte_bucket_paces_concurrent_senders_to_the_rate() -> None:
    clock = Clock()
    bucket = ByteBucket(rate=1000.0, clock=clock, burst=100.0)
    assert bucket.take(100) == 0.0
    # Three senders take 500 bytes each at the same instant: they queue in virtual time.
    waits = [bucket.take(500) for _ in range(3)]
    assert waits == pytest.approx([0.5, 1.0, 1.5])
    clock.now += 1.5
    assert bucket.take(0) == 0.0
    # Long run: total bytes / elapsed time converges on the rate.
    clock.now += 10
    sent, start = 0, clock.now
    for _ in range(200):
        clock.now += bucket.take(64)
        sent += 64
    assert sent / (clock.now - start) == pytest.approx(1000.0, rel=0.01)


def test_byte_bucket_unlimited() -> None:
    bucket = ByteBucket(rate=0, clock=Clock())
    assert bucket.take(10**9) == 0.0


def test_the_drain_jobs_pacing_is_the_same_bucket_started_empty() -> None:
    clock = Clock()
    bucket = TokenBucket(1000.0, 500.0, clock, full=False, shared=True)
    assert bucket.take(100) == pytest.approx(0.1)  # no allowance at the start
    clock.now += 10  # a long pause carries over no more than the burst
    assert bucket.take(600) == pytest.approx(0.1)  # 500 carried over, 100 to wait for


def test_try_take_takes_only_what_is_there() -> None:
    clock = Clock()
    bucket = TokenBucket(1.0, 2.0, clock)
    assert bucket.try_take() == 0.0 and bucket.try_take() == 0.0
    assert bucket.try_take() == pytest.approx(1.0)  # refused, nothing taken: no debt
    clock.now += 0.5
    assert bucket.try_take() == pytest.approx(0.5)
