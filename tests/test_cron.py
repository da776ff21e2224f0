"""Recurring tasks against PostgreSQL: a pass with a fixed clock (DST), pause/resume/run-now, two
schedulers at once, and the CLI. The cluster test with real runner processes is in test_cron_cluster.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from oban_py import Oban, worker
from oban_py.cron import CronTask, Schedule, load_tasks, run_pass
from oban_py.cron.scheduler import tick_key

pytestmark = pytest.mark.anyio

UTC = timezone.utc
NY = ZoneInfo("America/New_York")


@worker(name="test_cron.Report", queue="reports")
class Report:
    async def process(self, job: Any) -> None:
        return None


@worker(name="test_cron.OwnKey", queue="reports", unique=True)
class OwnKey:
    """A worker whose own unique key is the same for every job: ticks must not use it."""

    def unique_key(self, job: Any) -> Any:
        return "always-the-same"

    async def process(self, job: Any) -> None:
        return None


@worker(name="test_cron.Squatter", queue="reports", unique={"key": lambda job: job.args["key"]})
class Squatter:
    """Not a tick: an ordinary job whose key happens to be the one a tick would take."""

    async def process(self, job: Any) -> None:
        return None


def task(schedule: str, **extra: Any) -> dict[str, Any]:
    return {"worker": "test_cron.Report", "schedule": schedule, **extra}


async def ticks(db: asyncpg.Connection, prefix: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        f"SELECT meta->>'cron' AS name, meta->>'cron_at' AS at FROM \"{prefix}\".oban_jobs "
        "WHERE meta ? 'cron_at' ORDER BY id"
    )
    return [(r["name"], r["at"]) for r in rows]


async def test_a_fixed_clock_across_both_dst_changes(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    hourly = task("0 * * * *", timezone="America/New_York")
    oban = await make_oban(cron={"spring": hourly, "fall": hourly})
    tasks = load_tasks(oban.config)
    # Every 20 minutes for 3 h 40 min from local midnight on both change days: one job per real hour.
    for name, day in (
        ("spring", datetime(2026, 3, 8, tzinfo=NY)),
        ("fall", datetime(2026, 11, 1, tzinfo=NY)),
    ):
        start = day.astimezone(UTC)
        for step in range(12):
            await run_pass(oban.driver, {name: tasks[name]}, start + timedelta(minutes=20 * step))
    assert [at for _, at in await ticks(db, prefix)] == [
        # 2026-03-08: 01:00 EST, then 03:00 EDT (02:xx does not exist), 04:00 EDT.
        "2026-03-08T06:00:00+00:00",
        "2026-03-08T07:00:00+00:00",
        "2026-03-08T08:00:00+00:00",
        # 2026-11-01: 01:00 EDT, 01:00 EST (the hour happens twice), 02:00 EST.
        "2026-11-01T05:00:00+00:00",
        "2026-11-01T06:00:00+00:00",
        "2026-11-01T07:00:00+00:00",
    ]


async def test_racing_schedulers_insert_each_tick_once(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    a = await make_oban(cron={"fast": task("* * * * * *")})
    b = await make_oban(cron={"fast": task("* * * * * *")})
    start = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
    tasks = load_tasks(a.config)
    await run_pass(a.driver, tasks, start)
    for second in range(1, 6):
        now = start + timedelta(seconds=second, milliseconds=100)
        await asyncio.gather(*(run_pass(o.driver, tasks, now) for o in (a, b, a, b)))
    # Both again, later, from stale state: a restarted node repeating old ticks inserts nothing.
    await run_pass(b.driver, tasks, start + timedelta(seconds=5, milliseconds=500))
    got = [at for _, at in await ticks(db, prefix)]
    assert got == [(start + timedelta(seconds=s)).isoformat() for s in range(1, 6)]


async def test_downtime_enqueues_only_the_latest_missed_tick(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    oban = await make_oban(cron={"minutely": task("* * * * *")})
    tasks = load_tasks(oban.config)
    start = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)
    await run_pass(oban.driver, tasks, start)  # first sight: starts from here, enqueues nothing
    await run_pass(oban.driver, tasks, start + timedelta(hours=3))
    assert await ticks(db, prefix) == [("minutely", "2026-06-01T15:00:00+00:00")]


async def test_pause_resume_and_run_now(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    cron = {
        "minutely": task("* * * * *", args={"team": "ops"}, priority=3),
        "off": task("@daily", enabled=False),
    }
    oban = await make_oban(cron=cron)
    other = await make_oban(cron=cron)  # another node sees the pause: it is in the database
    tasks = load_tasks(oban.config)
    wall = datetime.now(UTC)
    await run_pass(oban.driver, tasks, wall)
    await oban.pause_cron("minutely")
    listed = {t.name: t for t in await other.cron_tasks()}
    assert listed["minutely"].paused and listed["minutely"].next_at is None
    assert not listed["off"].enabled and listed["off"].next_at is None
    await run_pass(other.driver, tasks, wall + timedelta(minutes=2))
    assert await ticks(db, prefix) == []

    await other.resume_cron("minutely")
    await run_pass(oban.driver, tasks, wall + timedelta(minutes=3, seconds=1))
    jobs = await ticks(db, prefix)
    assert len(jobs) == 1  # the ticks missed while paused are not enqueued: only one after resume
    listed = {t.name: t for t in await oban.cron_tasks(now=wall)}
    assert not listed["minutely"].paused
    assert listed["minutely"].next_at == (wall + timedelta(minutes=1)).replace(second=0, microsecond=0)

    manual = await oban.run_cron("off")  # disabled tasks can still be run by hand
    assert manual.meta == {"cron": "off", "cron_manual": True} and manual.queue == "reports"
    job = await oban.run_cron("minutely")
    assert job.args == {"team": "ops"} and job.priority == 3
    assert {t.name: t for t in await oban.cron_tasks()}["minutely"].last_job_id == job.id
    with pytest.raises(ValueError, match="not a recurring task"):
        await oban.pause_cron("nope")


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oban_py", "cron", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_list_pause_resume_run_json(tmp_path: Path, test_dsn: str, prefix: str) -> None:
    (tmp_path / "cron_workers.py").write_text(
        "from oban_py import worker\n\n"
        "@worker(name='cli.Cleanup', cron={'schedule': '*/10 * * * *', 'args': {'days': 7}})\n"
        "class Cleanup:\n    async def process(self, job):\n        pass\n"
    )
    (tmp_path / "oban.toml").write_text(
        f'prefix = "{prefix}"\nmodules = ["cron_workers"]\n\n'
        '[cron.nightly]\nworker = "cli.Cleanup"\nschedule = "0 3 * * *"\ntimezone = "Europe/Paris"\n'
    )
    env = {"OBAN_DSN": test_dsn}

    async def run(*args: str) -> Any:
        result = await asyncio.to_thread(cli, *args, "--json", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    listed = await run("list")
    assert [t["name"] for t in listed] == ["cli.Cleanup", "nightly"]
    assert listed[1]["timezone"] == "Europe/Paris" and listed[1]["next_at"].endswith("+00:00")
    assert await run("pause", "nightly") == {"task": "nightly", "paused": True}
    assert [t["paused"] for t in await run("list")] == [False, True]
    assert await run("resume", "nightly") == {"task": "nightly", "paused": False}
    ran = await run("run", "cli.Cleanup")
    assert ran["worker"] == "cli.Cleanup" and isinstance(ran["job_id"], int)
    assert (await run("list"))[0]["last_job_id"] == ran["job_id"]

    table = await asyncio.to_thread(cli, "list", cwd=tmp_path, env=env)
    assert table.returncode == 0 and "nightly" in table.stdout and "0 3 * * *" in table.stdout
    missing = await asyncio.to_thread(cli, "pause", "nope", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "not a recurring task" in missing.stderr


async def test_a_worker_unique_key_does_not_replace_the_tick_key(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    oban = await make_oban(cron={"own": {"worker": "test_cron.OwnKey", "schedule": "* * * * * *"}})
    tasks = load_tasks(oban.config)
    start = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
    await run_pass(oban.driver, tasks, start)
    for second in (1, 2, 3):
        await run_pass(oban.driver, tasks, start + timedelta(seconds=second))
    assert [at for _, at in await ticks(db, prefix)] == [
        (start + timedelta(seconds=s)).isoformat() for s in (1, 2, 3)
    ]
    # The worker's own key still holds for its other jobs.
    first = await oban.insert(OwnKey.new({}))
    assert not first.conflicted and (await oban.insert(OwnKey.new({"x": 1}))).conflicted


async def test_a_holder_that_is_not_a_tick_job_does_not_stop_the_pass(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    oban = await make_oban(cron={"t": task("* * * * * *"), "u": task("* * * * * *")})
    tasks = load_tasks(oban.config)
    start = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
    await run_pass(oban.driver, tasks, start)
    at = (start + timedelta(seconds=1)).isoformat()
    squatter = await oban.insert(
        Squatter.new({"key": tick_key(Report.new({}, meta={"cron": "t", "cron_at": at}))})
    )
    done = await run_pass(oban.driver, tasks, start + timedelta(seconds=1))
    assert [j.id for j in done if j.conflicted] == [squatter.id]  # t's tick: held, no KeyError
    assert await ticks(db, prefix) == [("u", at)]
    rows = {r["name"]: r for r in await db.fetch(f'SELECT * FROM "{prefix}".oban_cron')}
    assert rows["t"]["last_at"] == start + timedelta(seconds=1) and rows["t"]["last_job_id"] is None
    await run_pass(oban.driver, tasks, start + timedelta(seconds=2))  # both go on
    later = (start + timedelta(seconds=2)).isoformat()
    assert sorted(await ticks(db, prefix)) == [("t", later), ("u", at), ("u", later)]


async def test_a_broken_task_is_skipped_and_logged_once(
    make_oban: Callable[..., Awaitable[Oban]],
    prefix: str,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    oban = await make_oban(cron={"good": task("* * * * * *")})
    # A task whose job cannot be built (its worker is gone): not loadable, so built by hand.
    broken = CronTask(name="broken", worker="test_cron.Gone", schedule=Schedule("* * * * * *"))
    tasks = {"broken": broken, **load_tasks(oban.config)}
    start = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
    await run_pass(oban.driver, tasks, start)
    with caplog.at_level(logging.ERROR, logger="oban_py.cron"):
        for second in (1, 2, 3):
            await run_pass(oban.driver, tasks, start + timedelta(seconds=second))
    assert [n for n, _ in await ticks(db, prefix)] == ["good"] * 3
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "cron broken: skipped" in caplog.records[0].message and len(caplog.records) == 1


async def test_a_node_that_is_not_the_leader_schedules_its_own_tasks(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    # The leader is a node of another service: it has no tasks, so it cannot schedule them.
    other = await make_oban(queues={"elsewhere": 1}, name="other-service")
    deadline = asyncio.get_running_loop().time() + 10
    while not other.is_leader:
        assert asyncio.get_running_loop().time() < deadline, "no leader"
        await asyncio.sleep(0.05)
    await make_oban(queues={"reports": 1}, cron={"fast": task("* * * * * *")}, name="with-tasks")
    deadline = asyncio.get_running_loop().time() + 10
    while not await ticks(db, prefix):
        assert asyncio.get_running_loop().time() < deadline, "the non-leader node scheduled nothing"
        await asyncio.sleep(0.1)
    assert other.is_leader


async def test_resume_starts_from_the_database_clock(
    make_oban: Callable[..., Awaitable[Oban]], prefix: str, db: asyncpg.Connection
) -> None:
    oban = await make_oban(cron={"minutely": task("* * * * *")})
    await oban.pause_cron("minutely")
    await oban.resume_cron("minutely")
    row = await db.fetchrow(f'SELECT last_at, now() - last_at AS age FROM "{prefix}".oban_cron')
    assert timedelta(0) <= row["age"] < timedelta(seconds=5)
