"""Exponential backoff with jitter, shared by every loop that retries after database errors."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with jitter for retrying after database errors.

    ``next()`` counts a failure and returns the delay before the next attempt: ``base * 2**(n-1)``
    capped at ``cap``, scaled by a random factor in [0.5, 1) so that many loops losing the database at
    the same moment do not come back in lockstep. ``reset()`` after a success.
    """

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return float(min(self.cap, self.base * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.failures = 0
