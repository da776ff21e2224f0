"""Invariant 9: sustained load leaves the hot table lean (hundreds of dead tuples, not tens of thousands)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from oban_py import Job, worker

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@worker(queue="lean")
class Noop:
    async def process(self, job: Job[Any]) -> None:
        pass


async def test_dead_tuples_stay_low_at_200_jobs_per_second(make_oban: Any, db: asyncpg.Connection,
                                                           prefix: str) -> None:  # fmt: skip
    oban = await make_oban(queues={"lean": 10}, vacuum_interval=1.0, vacuum_threshold=500)
    rate, seconds = 200, 15
    samples: list[int] = []
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        await oban.insert(Noop.new({"n": n}))
        n += 1
        if n % 100 == 0:
            samples.append(
                await db.fetchval(
                    "SELECT n_dead_tup FROM pg_stat_user_tables "
                    "WHERE schemaname = $1 AND relname = 'oban_jobs'",
                    prefix,
                )
            )
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))  # the load's pace
    updates = await db.fetchval(
        "SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'oban_jobs'", prefix
    )
    assert n >= rate * seconds * 0.9 and updates > 2 * n * 0.8  # the load really happened
    assert max(samples) < 2_500, samples  # without the vacuum step this passes 4,000 within 15 s
