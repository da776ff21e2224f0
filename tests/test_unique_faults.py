"""Fault containment for unique keys (issue 10, items 8, 11 and 17).

* A job that lost its key (cancelled as a duplicate, released while running, or past its period) and is
  retried by hand meets the unique index again: it raises UniqueConflict naming the live holder, or
  takes the key (with a fresh period) when there is none.
* `group="scheduled"`: an immediate duplicate of a scheduled job is a duplicate (seed 002: the group
  is the set of states that are checked for duplicates).
* `replace` applies to a duplicate inside one insert_all exactly as it would to two separate inserts.
* Many processes inserting, replacing and cancelling over overlapping keys never deadlock into an
  error, and never leave two live holders of one key.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter
from collections.abc import Coroutine
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oban_py import Job, JobState, Oban, Worker, worker
from oban_py.db import parking
from oban_py.errors import UniqueConflict
from oban_py.runtime.claims import Target, claim_jobs

from helpers import wait_for

pytestmark = pytest.mark.anyio

INSTANCE = str(uuid.uuid4())


@worker(queue="faults", unique=True)
class Faulty(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


async def _fetch(oban: Oban) -> Any:
    rows = await claim_jobs(oban.driver, None, [Target("faults")], 1, node="t", instance=INSTANCE)
    assert rows and rows[0]["kind"] == "job"
    if rows[0]["parked"]:
        await parking.unpark(oban.driver, [rows[0]["id"]])
    return rows[0]


async def _ack(oban: Oban, row: Any, state: str, delay: float | None = None) -> None:
    await parking.transition(
        oban.driver,
        "job_ack",
        ids=[row["id"]],
        claims=[row["attempted_at"]],
        states=[state],
        delays=[delay],
        errors=[None],
        results=[None],
        metas=[None],
        attempt_deltas=[0],
    )


async def _stage(oban: Oban) -> None:
    await oban.driver.execute("job_make_due", queue="faults")
    await parking.transition(oban.driver, "job_stage", channel="x", limit=100)


async def _holds(db: asyncpg.Connection, prefix: str, job_id: int | None) -> bool:
    return bool(
        await db.fetchval(
            f'SELECT unique_key IS NOT NULL AND "{prefix}".oban_unique_holds(unique_states, state) '
            f'FROM "{prefix}".oban_jobs WHERE id = $1',
            job_id,
        )
    )


async def _state(oban: Oban, job_id: int | None) -> JobState:
    return (await oban.get_job(job_id)).state  # type: ignore[arg-type]


# -- item 8: a retry meets the unique index again ------------------------------------------------


async def _cancelled_duplicate(
    oban: Oban, opts: dict[str, Any], legacy: bool = False
) -> tuple[Job[Any], Job[Any]]:
    """A job cancelled as a duplicate by the engine (a parked row that lost its key), and its holder.

    ``legacy``: the job looks inserted before migration 003 (no unique_group, no unique_period).
    """
    a = await oban.insert(Faulty.new({"k": 1}, unique=opts))
    if legacy:
        await oban.driver.pool.execute(
            f'UPDATE "{oban.driver.prefix}".oban_jobs SET unique_group = NULL, unique_period = NULL '
            "WHERE id = $1",
            a.id,
        )
    await _ack(oban, await _fetch(oban), "retryable", delay=0)  # retryable: outside the group
    b = await oban.insert(Faulty.new({"k": 1}, unique=opts, schedule_in=60))
    assert not b.conflicted
    await parking.transition(
        oban.driver, "job_stage", channel="x", limit=100
    )  # a re-enters: parked, then lost
    cancelled = await oban.get_job(a.id)  # type: ignore[arg-type]
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.meta["unique_conflict"] | {"at": None} == {
        "holder": b.id,
        "state": "available",
        "outcome": "cancelled",
        "at": None,
    }
    return a, b


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "before-003"])
async def test_retry_of_a_cancelled_duplicate_names_the_holder(
    oban: Oban, db: asyncpg.Connection, prefix: str, legacy: bool
) -> None:
    # `cancelled` in the group: the loser must still not hold the key while it is cancelled.
    opts = {"group": ["scheduled", "available", "executing", "cancelled"], "keys": ["k"]}
    a, b = await _cancelled_duplicate(oban, opts, legacy)
    assert not await _holds(db, prefix, a.id) and await _holds(db, prefix, b.id)
    with pytest.raises(UniqueConflict) as info:
        await oban.retry_job(a.id)  # type: ignore[arg-type]
    assert (info.value.job_id, info.value.holder_id) == (a.id, b.id)
    assert await _state(oban, a.id) is JobState.CANCELLED  # nothing changed
    await oban.delete_job(b.id)  # type: ignore[arg-type]
    assert await oban.retry_job(a.id) is True  # type: ignore[arg-type]
    assert await _holds(db, prefix, a.id)
    again = await oban.insert(Faulty.new({"k": 1}, unique=opts))
    assert again.conflicted and again.id == a.id


async def test_retry_of_a_job_released_while_running(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    # A group without `available`: staged, the job leaves its group; started, it re-enters it while B
    # holds the key, so it runs without the key ("released").
    opts = {"group": ["scheduled", "executing"], "keys": ["k"]}
    a = await oban.insert(Faulty.new({"k": 1}, unique=opts, schedule_in=60))
    await _stage(oban)
    b = await oban.insert(Faulty.new({"k": 1}, unique=opts, schedule_in=60))
    assert not b.conflicted
    row = await _fetch(oban)
    assert row["id"] == a.id
    assert (await oban.get_job(a.id)).meta["unique_conflict"]["outcome"] == "released"  # type: ignore[arg-type]
    await _ack(oban, row, "completed")
    # Retried, A is `available`: outside its group, it holds nothing, but (like an immediate insert of
    # its key) it is a duplicate of the scheduled holder.
    with pytest.raises(UniqueConflict) as info:
        await oban.retry_job(a.id)  # type: ignore[arg-type]
    assert info.value.holder_id == b.id
    assert await _state(oban, a.id) is JobState.COMPLETED
    await oban.delete_job(b.id)  # type: ignore[arg-type]
    assert await oban.retry_job(a.id) is True  # type: ignore[arg-type]
    assert not await _holds(db, prefix, a.id)  # available is not in its group


async def test_retry_after_the_period_takes_a_fresh_key(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    opts = {"period": 60, "keys": ["k"]}
    old = datetime.now(timezone.utc) - timedelta(seconds=120)
    a = await oban.insert(Faulty.new({"k": 1}, unique=opts, scheduled_at=old))
    b = await oban.insert(Faulty.new({"k": 1}, unique=opts))  # a's window is over: b takes the key
    assert not b.conflicted and b.id != a.id
    await oban.cancel_job(a.id)  # type: ignore[arg-type]
    with pytest.raises(UniqueConflict) as info:  # a retry is an insert again: b holds the key
        await oban.retry_job(a.id)  # type: ignore[arg-type]
    assert info.value.holder_id == b.id
    await oban.delete_job(b.id)  # type: ignore[arg-type]
    assert await oban.retry_job(a.id) is True  # type: ignore[arg-type]
    assert await _holds(db, prefix, a.id)
    expires = await db.fetchval(
        f'SELECT unique_expires_at - now() FROM "{prefix}".oban_jobs WHERE id = $1', a.id
    )
    assert timedelta(seconds=59) < expires <= timedelta(seconds=60)  # a fresh window from the retry
    dup = await oban.insert(Faulty.new({"k": 1}, unique=opts))
    assert dup.conflicted and dup.id == a.id


async def test_retry_beside_an_expired_holder_takes_the_key(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    opts = {"period": 60, "keys": ["k"]}
    a = await oban.insert(Faulty.new({"k": 1}, unique=opts))
    await oban.cancel_job(a.id)  # type: ignore[arg-type]
    old = datetime.now(timezone.utc) - timedelta(seconds=120)
    b = await oban.insert(Faulty.new({"k": 1}, unique=opts, scheduled_at=old))  # holds, window over
    assert not b.conflicted and await _holds(db, prefix, b.id)
    assert await oban.retry_job(a.id) is True  # type: ignore[arg-type]
    assert await _holds(db, prefix, a.id) and not await _holds(db, prefix, b.id)


async def test_unpark_beside_an_expired_holder_takes_the_key(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    opts = {"group": ["scheduled", "available", "executing"], "keys": ["k"], "period": 60}
    a = await oban.insert(Faulty.new({"k": 1}, unique=opts))
    await _ack(oban, await _fetch(oban), "retryable", delay=0)
    old = datetime.now(timezone.utc) - timedelta(seconds=120)
    b = await oban.insert(Faulty.new({"k": 1}, unique=opts, scheduled_at=old))
    assert not b.conflicted
    await parking.transition(oban.driver, "job_stage", channel="x", limit=100)  # a re-enters its group
    assert await _state(oban, a.id) is JobState.AVAILABLE
    assert await _holds(db, prefix, a.id) and not await _holds(db, prefix, b.id)


async def test_retry_of_an_until_start_job_takes_the_key_again(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    opts = {"until": "start", "keys": ["k"]}
    a = await oban.insert(Faulty.new({"k": 1}, unique=opts))
    row = await _fetch(oban)  # started: released for good
    assert not await _holds(db, prefix, a.id)
    await _ack(oban, row, "discarded")
    assert await oban.retry_job(a.id) is True  # type: ignore[arg-type]
    assert await _holds(db, prefix, a.id)  # waiting to start again, as a new insert would
    dup = await oban.insert(Faulty.new({"k": 1}, unique=opts))
    assert dup.conflicted and dup.id == a.id


# -- item 17: the scheduled group and replace inside a batch ---------------------------------------


async def test_immediate_duplicate_of_a_scheduled_job(oban: Oban) -> None:
    opts = {"group": "scheduled", "keys": ["doc"]}
    held = await oban.insert(Faulty.new({"doc": 1}, unique=opts, schedule_in=60))
    now = await oban.insert(Faulty.new({"doc": 1}, unique=opts))
    assert now.conflicted and now.id == held.id and now.state is JobState.SCHEDULED
    batch = await oban.insert_all(
        [
            Faulty.new({"doc": 2}, unique=opts, schedule_in=60),
            Faulty.new({"doc": 2}, unique=opts),
            Faulty.new({"doc": 1}, unique=opts),
        ]
    )
    assert [j.conflicted for j in batch] == [False, True, True]
    assert batch[1].id == batch[0].id and batch[2].id == held.id
    # An available job is not in the group: it blocks nothing, so a scheduled one after it is new.
    first, second = await oban.insert_all(
        [Faulty.new({"doc": 3}, unique=opts), Faulty.new({"doc": 3}, unique=opts, schedule_in=60)]
    )
    assert not first.conflicted and not second.conflicted and first.id != second.id
    third = await oban.insert(Faulty.new({"doc": 3}, unique=opts))
    assert third.conflicted and third.id == second.id


async def test_batch_with_jobs_of_different_groups_on_one_key(oban: Oban) -> None:
    scheduled = {"group": "scheduled", "keys": ["doc"]}
    default = {"keys": ["doc"]}
    # An immediate `scheduled`-group job holds nothing, so the default-group job after it takes the key;
    # the other way round, the immediate one is a duplicate of the holder before it.
    free, holder = await oban.insert_all(
        [Faulty.new({"doc": 1}, unique=scheduled), Faulty.new({"doc": 1}, unique=default)]
    )
    assert not free.conflicted and not holder.conflicted and free.id != holder.id
    first, dup = await oban.insert_all(
        [Faulty.new({"doc": 2}, unique=default), Faulty.new({"doc": 2}, unique=scheduled)]
    )
    assert not first.conflicted and dup.conflicted and dup.id == first.id


async def test_debounce_with_an_immediate_duplicate(oban: Oban) -> None:
    opts = {"group": "scheduled", "keys": ["doc"], "replace": {"scheduled": ["scheduled_at", "args"]}}
    held = await oban.insert(Faulty.new({"doc": 1, "rev": 1}, unique=opts, schedule_in=60))
    now = await oban.insert(Faulty.new({"doc": 1, "rev": 2}, unique=opts))
    assert now.conflicted and now.id == held.id
    assert now.state is JobState.AVAILABLE and now.args == {"doc": 1, "rev": 2}  # run now, with rev 2


def _shape(job: Job[Any]) -> tuple[Any, ...]:
    return (job.conflicted, job.state, job.args.get("v"), job.priority)


async def test_replace_inside_one_insert_all_is_two_inserts(oban: Oban) -> None:
    args_only = {"keys": ["id"], "replace": {"available": ["args"]}}
    priority = {"keys": ["id"], "replace": {"available": ["priority"]}}
    plain = {"keys": ["id"]}

    def jobs(key: int) -> list[Job[Any]]:
        return [
            Faulty.new({"id": key, "v": 1}, unique=args_only),
            Faulty.new({"id": key, "v": 2}, unique=args_only),
            Faulty.new({"id": key, "v": 3}, unique=priority, priority=4),
            Faulty.new({"id": key, "v": 4}, unique=plain),
        ]

    batch = await oban.insert_all(jobs(1))
    assert [j.conflicted for j in batch] == [False, True, True, True]
    assert len({j.id for j in batch}) == 1
    assert [(j.args["v"], j.priority) for j in batch] == [(1, 0), (2, 0), (2, 4), (2, 4)]
    stored = await oban.get_job(batch[0].id)  # type: ignore[arg-type]
    assert (stored.args, stored.priority) == ({"id": 1, "v": 2}, 4)
    # The same inputs as separate inserts, on another key, give the same answers.
    one_by_one = [await oban.insert(j) for j in jobs(2)]
    assert [_shape(j) for j in batch] == [_shape(j) for j in one_by_one]


async def test_batch_replace_that_moves_the_holder_out_of_its_group(oban: Oban) -> None:
    opts = {"group": "scheduled", "keys": ["doc"], "replace": {"scheduled": ["scheduled_at", "args"]}}

    def jobs(key: int) -> list[Job[Any]]:
        return [
            Faulty.new({"doc": key, "v": 1}, unique=opts, schedule_in=60),
            Faulty.new({"doc": key, "v": 2}, unique=opts),  # replaces: the holder is due now
            Faulty.new({"doc": key, "v": 3}, unique=opts, schedule_in=60),  # no holder any more: new
            Faulty.new({"doc": key, "v": 4}, unique=opts),  # replaces the new one
        ]

    batch = await oban.insert_all(jobs(1))
    one_by_one = [await oban.insert(j) for j in jobs(2)]
    assert [_shape(j) for j in batch] == [_shape(j) for j in one_by_one]
    assert [j.conflicted for j in batch] == [False, True, False, True]
    assert batch[1].id == batch[0].id and batch[3].id == batch[2].id != batch[0].id


# -- item 11: a deadlock in a transaction of the engine's own is run again ----------------------------


async def _in_lock_order(db: asyncpg.Connection, prefix: str, ids: list[int | None]) -> list[int]:
    rows = await db.fetch(
        f'SELECT id FROM "{prefix}".oban_jobs WHERE id = ANY($1::bigint[]) ORDER BY unique_key, id', ids
    )
    return [r["id"] for r in rows]


async def _deadlock(
    test_dsn: str, db: asyncpg.Connection, prefix: str, ids: list[int], work: Coroutine[Any, Any, Any]
) -> Any:
    """Lock ids[1], run ``work``; once it locked ids[0] and waits for ids[1], lock ids[0]: a cycle.

    Our side's deadlock_timeout is long, so the engine's backend finds the cycle (after its 1 s) and
    its transaction is the one the server aborts.
    """
    other = await asyncpg.connect(test_dsn)
    try:
        async with other.transaction():
            await other.execute("SET LOCAL deadlock_timeout = '60s'")
            await other.execute(f'SELECT 1 FROM "{prefix}".oban_jobs WHERE id = $1 FOR UPDATE', ids[1])
            pid = other.get_server_pid()
            engine = asyncio.create_task(work)

            async def engine_waits_on_us() -> bool:
                return bool(
                    await db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
                    )
                )

            await wait_for(engine_waits_on_us)
            await other.execute(f'SELECT 1 FROM "{prefix}".oban_jobs WHERE id = $1 FOR UPDATE', ids[0])
            assert not engine.done()  # it was aborted, ran again, and now waits for us to commit
    finally:
        await other.close()
    return await engine


async def test_cancel_that_deadlocks_runs_again(
    test_dsn: str, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    jobs = await oban.insert_all([Faulty.new({"k": i}) for i in range(2)])
    ids = await _in_lock_order(db, prefix, [j.id for j in jobs])
    assert await _deadlock(test_dsn, db, prefix, ids, oban.cancel_jobs(ids)) == 2


async def test_insert_that_deadlocks_runs_again(
    test_dsn: str, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    opts = {"keys": ["k"], "replace": {"available": ["args"]}}
    held = await oban.insert_all([Faulty.new({"k": i, "v": 0}, unique=opts) for i in range(2)])
    ids = await _in_lock_order(db, prefix, [j.id for j in held])
    batch = oban.insert_all([Faulty.new({"k": i, "v": 1}, unique=opts) for i in range(2)])
    answers = await _deadlock(test_dsn, db, prefix, ids, batch)
    assert [(j.conflicted, j.args["v"]) for j in answers] == [(True, 1), (True, 1)]
    assert {j.id for j in answers} == {j.id for j in held}


# -- item 11: no deadlock under contention ---------------------------------------------------------

PROCESSES = 8
KEYS = 40
OPS = 250
SCRIPT = Path(__file__).with_name("contend.py")


@pytest.mark.slow
async def test_mixed_contention_never_deadlocks(
    test_dsn: str, prefix: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    outs = [tmp_path / f"mixed{i}.json" for i in range(PROCESSES)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "mixed",
            test_dsn,
            prefix,
            str(KEYS),
            str(OPS),
            str(i),
            str(outs[i]),
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(PROCESSES)
    ]
    stderrs = await asyncio.gather(*(p.communicate() for p in procs))
    assert [p.returncode for p in procs] == [0] * PROCESSES, [e[1].decode()[-2000:] for e in stderrs]
    outputs = [json.loads(o.read_text()) for o in outs]
    errors = [e for o in outputs for e in o["errors"]]
    assert errors == []
    ops = Counter(kind for o in outputs for kind in o["ops"])
    assert ops["insert_all"] and ops["replace"] and ops["cancel"]
    q = f'"{prefix}"'
    rows = await db.fetch(
        f"""SELECT (args->>'k')::int AS k, id, state::text AS state, unique_states,
                   {q}.oban_unique_holds(unique_states, state) AS holds,
                   COALESCE(unique_expires_at > now(), true) AS open
            FROM {q}.oban_jobs"""
    )
    holders = Counter(r["k"] for r in rows if r["holds"])
    assert holders and max(holders.values()) == 1
    # One live job per key (the default group: every state but cancelled), except jobs whose period is
    # over: they gave up the key, and a later insert took it.
    live = [r for r in rows if r["state"] != "cancelled"]
    assert all(r["holds"] or not r["open"] for r in live)
    open_live = Counter(r["k"] for r in live if r["open"])
    assert max(open_live.values()) == 1
    assert not any(r["unique_states"] & 128 for r in rows)  # nothing left parked
    by_id = {r["id"]: r["k"] for r in rows}
    answers = [a for o in outputs for a in o["results"]]
    assert answers and all(by_id[job_id] == key for key, job_id, _c in answers)
