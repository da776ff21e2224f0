"""Helpers shared by tests: wait on a condition instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import asyncpg


async def wait_for(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def states(db: asyncpg.Connection, prefix: str) -> dict[str, int]:
    rows = await db.fetch(f'SELECT state::text AS s, count(*) AS n FROM "{prefix}".oban_jobs GROUP BY 1')
    return {r["s"]: r["n"] for r in rows}
