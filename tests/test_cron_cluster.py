"""Two real runner processes both scheduling a task every second: one job per tick, none missing, also
when the leader is killed with SIGKILL and the survivor goes on alone."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from project import Project, wait_process_ready

pytestmark = pytest.mark.anyio


async def tick_counts(db: asyncpg.Connection, prefix: str) -> dict[datetime, int]:
    rows = await db.fetch(
        f"SELECT meta->>'cron_at' AS at, count(*) AS n FROM \"{prefix}\".oban_jobs "
        "WHERE meta->>'cron' = 'every_second' GROUP BY 1"
    )
    return {datetime.fromisoformat(r["at"]): r["n"] for r in rows}


def assert_once_per_tick(counts: dict[datetime, int]) -> None:
    assert counts, "no tick was enqueued"
    assert set(counts.values()) == {1}, f"a tick was enqueued twice: {counts}"
    first, last = min(counts), max(counts)
    expected = {first + timedelta(seconds=s) for s in range(int((last - first).total_seconds()) + 1)}
    assert set(counts) == expected, f"ticks missing: {sorted(expected - set(counts))}"


async def wait_ticks(db: asyncpg.Connection, prefix: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(await tick_counts(db, prefix)) < n:
        assert time.monotonic() < deadline, f"only {len(await tick_counts(db, prefix))}/{n} ticks"
        await asyncio.sleep(0.2)


async def test_two_runners_one_job_per_tick_through_a_leader_kill(
    tmp_path: Path, test_dsn: str, prefix: str, db: asyncpg.Connection
) -> None:
    cron = {"every_second": {"worker": "project.Sleepy", "schedule": "* * * * * *", "args": {"sleep": 0}}}
    proj = Project(tmp_path, test_dsn, prefix, queues={"work": 5}, cron=cron)
    try:
        for i in range(2):
            proj.start(node=f"runner-{i}")
        for i in range(2):
            await wait_process_ready(proj, i)
        await wait_ticks(db, prefix, 1)
        await asyncio.sleep(6)
        before = await tick_counts(db, prefix)
        assert len(before) >= 5
        assert_once_per_tick(before)

        leader = await db.fetchval(f'SELECT node FROM "{prefix}".oban_leaders WHERE expires_at > now()')
        index = int(leader.removeprefix("runner-"))
        proj.procs[index].send_signal(signal.SIGKILL)
        proj.procs[index].wait()
        # Every node with tasks schedules, so the survivor goes on; it also takes the lease (3 s ttl).
        await wait_ticks(db, prefix, len(before) + 8, timeout=30)
        after = await tick_counts(db, prefix)
        assert_once_per_tick(after)
        survivor = await db.fetchval(f'SELECT node FROM "{prefix}".oban_leaders WHERE expires_at > now()')
        assert survivor == f"runner-{1 - index}"
    finally:
        proj.stop_all()
