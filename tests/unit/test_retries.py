"""The retry policies, one per destination kind, as declared in gateway/retries.py."""

from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.forward.client import DELIVERED, REJECT, RETRY, classify
from gateway.retries import CLOUD, GATEWAY, OBJECT_STORE, cloud_policy


def test_the_store_is_tried_thrice_0_1_and_0_2_s_apart() -> None:
    assert [OBJECT_STORE.delay_s(n) for n in (1, 2)] == [0.1, 0.2]
    assert not OBJECT_STORE.gives_up_after(2) and OBJECT_STORE.gives_up_after(3)
    assert OBJECT_STORE.retries(503) and not OBJECT_STORE.retries(500) and not OBJECT_STORE.retries(403)


def test_the_drain_job_doubles_from_half_a_second_up_to_ten() -> None:
    assert [GATEWAY.delay_s(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert GATEWAY.gives_up_after(4) and all(GATEWAY.retries(s) for s in (408, 429, 500, 503))
    assert not GATEWAY.retries(404)


def test_the_cloud_policy_takes_the_settings_and_jitters() -> None:
    forward = Settings().forward
    policy = cloud_policy(forward)
    assert (policy.first_delay_s, policy.max_delay_s, policy.attempts) == (
        forward.backoff_base_s, forward.backoff_max_s, forward.max_attempts)
    assert policy.delay_s(3, rand=lambda: 1.0) == min(forward.backoff_max_s, forward.backoff_base_s * 4)
    assert policy.delay_s(3, rand=lambda: 0.0) == 0.0
    assert not CLOUD.gives_up_after(10**6)  # attempts 0: no limit


@pytest.mark.parametrize(("status", "kind"), [(200, DELIVERED), (409, DELIVERED), (408, RETRY), (429, RETRY),
                                              (500, RETRY), (599, RETRY), (400, REJECT), (401, REJECT)])
def test_the_cloud_client_sorts_answers_by_the_policy(status: int, kind: str) -> None:
    assert classify(status, b"{}").kind == kind
