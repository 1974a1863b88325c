"""Exponential backoff with jitter: how long the router waits before a retry."""

from __future__ import annotations

import random

from orchestrator.config import RetryPolicy

__all__ = ["backoff_delay"]


def backoff_delay(retry: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first retry).

    ``min(base * factor ** (retry - 1), max)`` stretched by a random ``U(0, jitter)``
    fraction, so that clients that failed together do not retry together: with the
    defaults 2.0-2.5 s, then 4.0-5.0 s, then 8.0-10.0 s. Jitter only lengthens a wait,
    so the exponential floor holds for a struggling provider.
    """
    if retry < 1:
        raise ValueError(f"retry counts from 1, got {retry}")
    try:
        base = policy.backoff_base * policy.backoff_factor ** (retry - 1)
    except OverflowError:
        base = policy.backoff_max
    base = min(base, policy.backoff_max)
    return base * (1.0 + rng.uniform(0.0, policy.jitter))
