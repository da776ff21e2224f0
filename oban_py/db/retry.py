"""Running a whole transaction of our own again when the server aborted it to break a deadlock."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

__all__ = ["DEADLOCK_RETRIES", "deadlocked", "retry_deadlocks"]

DEADLOCK_RETRIES = 5
T = TypeVar("T")
log = logging.getLogger("oban_py")


def deadlocked(exc: BaseException) -> bool:
    """True for a deadlock the server broke by aborting us (raw, or mapped to DatabaseUnavailable)."""
    return isinstance(exc, asyncpg.DeadlockDetectedError) or isinstance(
        exc.__cause__, asyncpg.DeadlockDetectedError
    )


async def retry_deadlocks(run: Callable[[], Awaitable[T]], *, retries: int = DEADLOCK_RETRIES) -> T:
    """``run()``, run again (up to ``retries`` times, after a short random pause) when it deadlocks.

    Only for work that is a whole transaction of our own (a statement on a pooled connection, or a
    transaction we opened): the server rolled it back entirely, so running it again is safe. Rows are
    locked in one order everywhere, so a deadlock is rare; this is the last line of defence.
    """
    for attempt in range(retries + 1):
        try:
            return await run()
        except Exception as exc:
            if attempt == retries or not deadlocked(exc):
                raise
            log.info("deadlock (%s); running it again", exc, extra={"attempt": attempt + 1})
            await asyncio.sleep(random.uniform(0.005, 0.02 * 2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover
