"""Running jobs: outcomes, retries, timeouts, sync jobs in threads, limits, ordering, staging."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

import asyncpg
import pytest

from oban_py import Cancel, Job, JobState, Oban, Record, Snooze, Worker, current_job, job, worker

from helpers import EventLog, duty_runs, states, wait_for

pytestmark = pytest.mark.anyio

events: list[Any] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    events.clear()


@worker(queue="exec")
class Echo(Worker):
    async def process(self, job: Job[Any]) -> None:
        assert current_job() is job
        events.append(("echo", job.args, job.attempt))


@worker(queue="exec", max_attempts=3)
class Boom(Worker):
    def backoff(self, job: Job[Any]) -> float:
        return float(job.args.get("backoff", 100))

    async def process(self, job: Job[Any]) -> None:
        events.append(("boom", job.attempt))
        raise ValueError(f"boom {job.attempt}")


@worker(queue="exec")
class Napper(Worker):
    async def process(self, job: Job[Any]) -> Snooze | None:
        events.append(("nap", job.attempt, job.meta.get("snoozed")))
        if not job.meta.get("snoozed"):
            return Snooze(0.2, meta={"why": "not yet"})
        return None


@worker(queue="exec")
class Quitter(Worker):
    async def process(self, job: Job[Any]) -> None:
        raise Cancel("no longer needed")


@worker(queue="exec")
class Recorder(Worker):
    async def process(self, job: Job[Any]) -> Record:
        return Record({"total": sum(job.args["values"])})


@worker(queue="exec", timeout=0.2)
class Slowpoke(Worker):
    def backoff(self, job: Job[Any]) -> float:
        return 60

    async def process(self, job: Job[Any]) -> None:
        await asyncio.sleep(5)
        events.append("not reached")


@worker(queue="slow")
class SyncSleeper(Worker):
    def process(self, job: Job[Any]) -> None:  # a plain def: runs in a worker thread
        events.append(("sync-start", threading.current_thread() is threading.main_thread()))
        time.sleep(job.args["seconds"])
        events.append("sync-end")


@job(queue="exec")
def sync_function(a: int, b: int) -> None:
    events.append(("fn", a, b, current_job() is not None))


async def run_queue(make_oban: Any, **queues: int) -> Oban:
    return await make_oban(queues=queues)  # type: ignore[no-any-return]


async def job_row(db: asyncpg.Connection, prefix: str, job_id: int | None) -> Any:
    return await db.fetchrow(f'SELECT *, state::text AS st FROM "{prefix}".oban_jobs WHERE id = $1', job_id)


async def test_completed(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    oban = await make_oban(queues={"exec": 5}, node="exec-node")
    inserted = await oban.insert(Echo.new({"x": 1}))
    await wait_for(lambda: events)
    row = await wait_for(lambda: _state_is(db, prefix, inserted.id, "completed"))
    assert events == [("echo", {"x": 1}, 1)]
    assert row["attempt"] == 1 and row["completed_at"] is not None and row["attempted_by"] == "exec-node"


async def _state_is(db: asyncpg.Connection, prefix: str, job_id: int | None, state: str) -> Any:
    row = await job_row(db, prefix, job_id)
    return row if row is not None and row["st"] == state else None


async def test_error_is_retried_with_backoff_and_traceback(
    make_oban: Any, db: asyncpg.Connection, prefix: str
) -> None:
    oban = await run_queue(make_oban, exec=5)
    inserted = await oban.insert(Boom.new({"backoff": 100}))
    row = await wait_for(lambda: _state_is(db, prefix, inserted.id, "retryable"))
    job_ = await oban.get_job(row["id"])
    assert job_.attempt == 1 and len(job_.errors) == 1
    error = job_.errors[0]
    assert error["error"] == "ValueError: boom 1" and error["attempt"] == 1
    assert 'raise ValueError(f"boom {job.attempt}")' in error["traceback"]
    delay = (row["scheduled_at"] - datetime.now(timezone.utc)).total_seconds()
    assert 95 < delay <= 100


async def test_discarded_after_max_attempts(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    oban = await run_queue(make_oban, exec=5)
    inserted = await oban.insert(Boom.new({"backoff": 0}))
    row = await wait_for(lambda: _state_is(db, prefix, inserted.id, "discarded"))
    assert row["attempt"] == 3 and row["discarded_at"] is not None
    assert [e[1] for e in events] == [1, 2, 3]
    assert [e["error"] for e in (await oban.get_job(inserted.id)).errors] == [  # type: ignore[arg-type]
        "ValueError: boom 1",
        "ValueError: boom 2",
        "ValueError: boom 3",
    ]


async def test_default_backoff_grows() -> None:
    from oban_py.runtime.outcome import default_backoff

    first = [default_backoff(a) for a in (1, 2, 5, 10)]
    assert 15 < first[0] < 19 and first[1] < first[2] < first[3]
    assert default_backoff(20) <= 86_400 * 1.1


async def test_snooze_does_not_use_an_attempt(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    oban = await run_queue(make_oban, exec=5)
    inserted = await oban.insert(Napper.new({}))
    row = await wait_for(lambda: _state_is(db, prefix, inserted.id, "completed"))
    assert events == [("nap", 1, None), ("nap", 1, 1)]
    job_ = await oban.get_job(row["id"])
    assert job_.attempt == 1 and job_.meta == {"snoozed": 1, "why": "not yet"} and job_.errors == []


async def test_cancel_and_record(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    oban = await run_queue(make_oban, exec=5)
    cancelled = await oban.insert(Quitter.new({}))
    recorded = await oban.insert(Recorder.new({"values": [1, 2, 3]}))
    await wait_for(lambda: _state_is(db, prefix, cancelled.id, "cancelled"))
    await wait_for(lambda: _state_is(db, prefix, recorded.id, "completed"))
    assert (await oban.get_job(cancelled.id)).errors[0]["error"] == "no longer needed"  # type: ignore[arg-type]
    assert (await oban.get_job(recorded.id)).result == {"total": 6}  # type: ignore[arg-type]


async def test_timeout_fails_the_attempt(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    oban = await run_queue(make_oban, exec=5)
    started = time.monotonic()
    inserted = await oban.insert(Slowpoke.new({}))
    await wait_for(lambda: _state_is(db, prefix, inserted.id, "retryable"))
    assert time.monotonic() - started < 3
    error = (await oban.get_job(inserted.id)).errors[0]  # type: ignore[arg-type]
    assert error["kind"] == "timeout" and "TimeoutError" in error["error"]
    assert "not reached" not in events


async def test_sync_job_runs_in_a_thread_without_blocking_other_queues(
    make_oban: Any, db: asyncpg.Connection, prefix: str
) -> None:
    oban = await run_queue(make_oban, exec=5, slow=2)
    await oban.insert(SyncSleeper.new({"seconds": 1.0}))
    await wait_for(lambda: ("sync-start", False) in events)
    ticks = 0
    fast = await oban.insert(Echo.new({"while": "sync runs"}))
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # a measurement: how often the loop gets to run meanwhile
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks > 30  # the loop stayed responsive (a blocked loop would tick about once)
    row = await job_row(db, prefix, fast.id)
    assert row["st"] == "completed" and "sync-end" not in events  # the other queue ran meanwhile
    await wait_for(lambda: "sync-end" in events)


async def test_sync_function_job(make_oban: Any) -> None:
    await run_queue(make_oban, exec=5)
    await sync_function.enqueue(1, b=2)
    await wait_for(lambda: ("fn", 1, 2, True) in events)


async def test_unregistered_worker_fails_without_importing(
    make_oban: Any, db: asyncpg.Connection, prefix: str
) -> None:
    oban = await run_queue(make_oban, exec=5)
    bad = await oban.insert(Job(worker="oban_canary_module.Evil", args={}, queue="exec"))
    row = await wait_for(lambda: _state_is(db, prefix, bad.id, "retryable"))
    assert "oban_canary_module" not in sys.modules
    error = (await oban.get_job(row["id"])).errors[0]
    assert error["kind"] == "unknown_worker" and "oban_canary_module.Evil" in error["error"]
    assert "not registered" in error["error"]


async def test_scheduled_job_is_staged_then_run(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    oban = await run_queue(make_oban, exec=5)
    inserted = await oban.insert(Echo.new({"later": True}, schedule_in=1.0))
    assert inserted.state is JobState.SCHEDULED
    await duty_runs(oban, "stager")  # staging ran (every 0.1 s) before the job was due: not staged
    assert events == [] and await _state_is(db, prefix, inserted.id, "scheduled")
    await wait_for(lambda: _state_is(db, prefix, inserted.id, "completed"), timeout=5)


async def test_priority_then_time_order(make_oban: Any, oban: Oban) -> None:
    jobs = [Echo.new({"n": n}, priority=p) for n, p in enumerate([5, 0, 9, 0, 5])]
    await oban.insert_all(jobs)
    await make_oban(queues={"exec": 1})
    await wait_for(lambda: len(events) == 5)
    assert [e[1]["n"] for e in events] == [1, 3, 0, 4, 2]


running = {"now": 0, "max": 0}


@worker(queue="limited")
class Counted(Worker):
    async def process(self, job: Job[Any]) -> None:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await asyncio.sleep(0.05)
        running["now"] -= 1


async def test_local_limit_is_respected(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    running.update(now=0, max=0)
    await oban.insert_all([Counted.new({"i": i}) for i in range(30)])
    await make_oban(queues={"limited": 3})
    await wait_for(lambda: _all_done(db, prefix, 30), timeout=15)
    assert running["max"] == 3


async def _all_done(db: asyncpg.Connection, prefix: str, n: int) -> bool:
    return (await states(db, prefix)).get("completed", 0) == n


async def test_drain_queue(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    await oban.insert_all([Echo.new({"i": i}) for i in range(3)] + [Boom.new({"backoff": 0})])
    counts = await oban.drain_queue("exec", with_scheduled=True)
    assert counts == {"completed": 3, "retryable": 2, "discarded": 1}
    assert await states(db, prefix) == {"completed": 3, "discarded": 1}


@worker(queue="drained")
class LongNap(Worker):
    async def process(self, job: Job[Any]) -> None:
        await asyncio.sleep(job.args["seconds"])


async def test_drain_registers_as_a_node_so_a_running_cluster_does_not_rescue_it(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(name="cluster", node="cluster", queues={"other": 1})  # its rescuer runs every 0.2 s
    job_ = await oban.insert(LongNap.new({"seconds": 2.5}))  # longer than rescue_after (1 s)
    assert await oban.drain_queue("drained") == {"completed": 1}
    row = await db.fetchrow(
        f"SELECT state::text, attempt, meta FROM {prefix}.oban_jobs WHERE id = $1", job_.id
    )
    assert (row["state"], row["attempt"]) == ("completed", 1)
    assert "rescued" not in json.loads(row["meta"])
    nodes = await db.fetch(f"SELECT node FROM {prefix}.oban_nodes")
    assert [n["node"] for n in nodes] == ["cluster"]  # the drain's own row is gone


async def test_notify_wakes_the_producer(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    log = EventLog()
    runner = await make_oban(queues={"exec": 2}, poll_interval=30, stage_interval=30, before_start=log.attach)
    assert log.count("notifier.listening") == 1  # start() returns once LISTEN is up
    await log.wait("duty.ran", duty="poller")  # the first poll passed: now only a NOTIFY wakes it soon
    started = time.monotonic()
    job_ = await runner.insert(Echo.new({"wake": 1}))
    await wait_for(lambda: _state_is(db, prefix, job_.id, "completed"), timeout=5)
    assert time.monotonic() - started < 1.0


async def test_poll_only_mode(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    log = EventLog()
    runner = await make_oban(queues={"exec": 2}, notifier="poll", poll_interval=0.1, before_start=log.attach)
    listeners = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND datname = current_database()"
    )
    assert listeners == 0
    job_ = await runner.insert(Echo.new({"poll": 1}))
    await wait_for(lambda: _state_is(db, prefix, job_.id, "completed"), timeout=5)
    assert log.count("notifier.listening") == 0
