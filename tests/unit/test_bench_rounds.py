"""The benchmark's rounds: a round whose every request failed says why instead of dividing by zero."""

from __future__ import annotations

import pytest

from scripts.bench import metered
from scripts.benchlib.load import _run


def _refused(n: int, conn: object) -> None:
    raise ConnectionRefusedError(f"request {n}: no writable volumes")


def test_a_round_keeps_its_first_failure() -> None:
    r = _run("s3", 1024, 2, 6, _refused, lambda: None)
    assert (r.requests, r.errors, r.rps) == (0, 6, 0.0)
    assert r.first_error.startswith("ConnectionRefusedError: request ") and "no writable volumes" in r.first_error


def test_a_round_without_one_success_stops_the_bench_with_the_reason() -> None:
    with pytest.raises(RuntimeError, match=r"every request of a s3 round failed \(4\).*no writable volumes"):
        metered({}, None, _run, "s3", 1024, 2, 4, _refused, lambda: None)


def test_a_round_with_successes_is_measured() -> None:
    r = metered({}, None, _run, "s3", 1024, 2, 4, lambda n, conn: None, lambda: None)
    assert (r.requests, r.errors, r.first_error) == (4, 0, "")
