from __future__ import annotations

import secrets

from gateway.ingest.seen import SeenKeys


def test_no_false_negatives_and_few_false_positives() -> None:
    seen = SeenKeys(20_000)
    keys = [secrets.token_hex(16) for _ in range(20_000)]
    for key in keys:
        seen.add(key)
    assert all(key in seen for key in keys)
    others = [secrets.token_hex(16) for _ in range(20_000)]
    false_positives = sum(key in seen for key in others)
    assert false_positives < 20_000 * 0.03  # sized for about 1 %


def test_full_when_past_capacity() -> None:
    seen = SeenKeys(10)
    for i in range(11):
        seen.add(str(i))
    assert seen.full
