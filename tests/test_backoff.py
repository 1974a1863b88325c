"""Backoff: exponential, jittered upwards only, capped, reproducible with a seed."""

from __future__ import annotations

import random

import pytest

from orchestrator.backoff import backoff_delay
from orchestrator.config import RetryPolicy


def test_the_demo_waits_grow_from_two_then_four_seconds():
    policy = RetryPolicy()
    rng = random.Random(1)
    waits = [backoff_delay(retry, policy, rng) for retry in (1, 2, 3)]
    assert 2.0 <= waits[0] <= 2.5
    assert 4.0 <= waits[1] <= 5.0
    assert 8.0 <= waits[2] <= 10.0


def test_the_same_seed_gives_the_same_waits():
    policy = RetryPolicy()
    first = [backoff_delay(n, policy, random.Random(7)) for n in (1, 2)]
    again = [backoff_delay(n, policy, random.Random(7)) for n in (1, 2)]
    assert first == again


def test_the_cap_and_no_jitter():
    policy = RetryPolicy(backoff_base=1.0, backoff_factor=10.0, backoff_max=5.0, jitter=0.0)
    rng = random.Random(0)
    assert [backoff_delay(n, policy, rng) for n in (1, 2, 3, 2000)] == [1.0, 5.0, 5.0, 5.0]


def test_retry_counts_from_one():
    with pytest.raises(ValueError):
        backoff_delay(0, RetryPolicy(), random.Random())
