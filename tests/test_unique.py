"""Insert-time uniqueness: options, groups, exact windows, conflicts without writes, no wedged transitions."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from oban_py import Job, JobState, Oban, Snooze, UniqueOptions, Worker, worker
from oban_py.db import parking
from oban_py.errors import UniqueConflict, UniqueOptionsError, ValidationError
from oban_py.runtime.claims import Target, claim_jobs

from helpers import wait_for

pytestmark = pytest.mark.anyio


@worker(queue="default", unique=True)
class MyWorker(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


# -- seed 002, as written (import renamed) ----------------------------------------------------------


async def test_seed_examples(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    # "You can also specify a period to limit how long jobs are considered duplicates"
    first = await MyWorker.enqueue({"id": 1}, unique={"period": 300})
    second = await MyWorker.enqueue({"id": 1}, unique={"period": 300})
    assert not first.conflicted and second.conflicted and second.id == first.id

    # "Detecting Conflicts"
    job = await oban.insert(MyWorker.new({"id": 1}, unique=True))
    if job.conflicted:  # noqa: SIM108 - the seed's example, as written
        message = "Job already exists"
    else:
        message = f"Job inserted with ID: {job.id}"
    assert message == "Job already exists" and job.id == first.id

    # "Specifying Fields and Keys": whole args vs only the url key
    a = await MyWorker.enqueue(
        {"url": "https://a", "user_id": 1}, unique={"fields": ["worker", "queue", "args"]}
    )
    b = await MyWorker.enqueue(
        {"url": "https://a", "user_id": 2}, unique={"fields": ["worker", "queue", "args"]}
    )
    assert not a.conflicted and not b.conflicted
    c = await MyWorker.enqueue(
        {"url": "https://b", "user_id": 1}, unique={"keys": ["url"], "fields": ["worker", "queue", "args"]}
    )
    d = await MyWorker.enqueue(
        {"url": "https://b", "user_id": 2}, unique={"keys": ["url"], "fields": ["worker", "queue", "args"]}
    )
    assert not c.conflicted and d.conflicted and d.id == c.id


@worker(
    unique={
        # Jobs should be unique for 2 minutes
        "period": 120,
        # Don't consider the whole args field, just the url key within args
        "keys": ["url"],
        # Consider a job unique across all states, including cancelled/discarded
        "group": "all",
        # Consider a job unique across queues; only compare the worker and url key
        "fields": ["worker", "args"],
    }
)
class Crawler(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


async def test_seed_complex_options(oban: Oban) -> None:
    one = await Crawler.enqueue({"url": "https://x", "depth": 1}, queue="a")
    two = await Crawler.enqueue({"url": "https://x", "depth": 2}, queue="b")  # other queue, other depth
    assert two.conflicted and two.id == one.id
    await oban.cancel_job(one.id)  # type: ignore[arg-type]
    three = await Crawler.enqueue({"url": "https://x"})
    assert three.conflicted and three.state is JobState.CANCELLED  # "all" includes cancelled


email_running: dict[str, int] = {"now": 0, "max": 0}


@worker(queue="emails")
class EmailWorker(Worker):
    async def process(self, job: Job[Any]) -> None:
        email_running["now"] += 1
        email_running["max"] = max(email_running["max"], email_running["now"])
        await asyncio.sleep(0.3)
        email_running["now"] -= 1


async def test_seed_uniqueness_is_not_concurrency(
    make_oban: Any, db: asyncpg.Connection, prefix: str
) -> None:
    oban = await make_oban(queues={"emails": 10})  # [queues] emails = 10
    jobs = [EmailWorker.new({"user_id": id}, unique=True) for id in range(1, 11)]
    await oban.insert_all(jobs)
    await wait_for(lambda: email_running["max"] == 10, timeout=5)  # all 10 ran at once


# -- conflicts ------------------------------------------------------------------------------------


async def test_duplicate_returns_holder_without_writing(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    holder = await oban.insert(MyWorker.new({"id": 7}, meta={"who": "first"}))
    before = await db.fetchrow(f'SELECT xmin::text AS x, ctid::text AS c FROM "{prefix}".oban_jobs')
    for _ in range(1000):
        dup = await oban.insert(MyWorker.new({"id": 7}, meta={"who": "dup"}))
        assert dup.conflicted and dup.id == holder.id
    assert dup.meta == {"who": "first"} and dup.args == {"id": 7} and dup.state is JobState.AVAILABLE
    after = await db.fetchrow(f'SELECT xmin::text AS x, ctid::text AS c FROM "{prefix}".oban_jobs')
    assert tuple(before) == tuple(after)
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs') == 1


async def test_insert_all_dedupes_in_batch_and_against_table(oban: Oban) -> None:
    existing = await oban.insert(MyWorker.new({"k": "old"}))
    batch = [
        MyWorker.new({"k": "a"}),
        MyWorker.new({"k": "old"}),
        MyWorker.new({"k": "a"}),
        MyWorker.new({"k": "b"}),
        MyWorker.new({"k": "b"}, unique=False),
    ]
    results = await oban.insert_all(batch)
    assert [r.conflicted for r in results] == [False, True, True, False, False]
    assert results[1].id == existing.id and results[2].id == results[0].id
    assert len({r.id for r in results}) == 4
    assert [r.args["k"] for r in results] == ["a", "old", "a", "b", "b"]


async def test_bypass_per_insert(oban: Oban) -> None:
    one = await oban.insert(MyWorker.new({"x": 1}))
    two = await oban.insert(MyWorker.new({"x": 1}, unique=False))
    assert not two.conflicted and two.id != one.id


@worker(unique={"fields": ["args"], "keys": ["account.id", "region"]})
class Nested(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


@worker(queue="other", unique={"fields": ["args"], "keys": ["account.id", "region"]})
class NestedElsewhere(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


async def test_keys_with_nested_paths_and_fields_subsets(oban: Oban) -> None:
    a = await Nested.enqueue({"account": {"id": 1, "name": "x"}, "region": "eu", "extra": 1})
    b = await Nested.enqueue({"account": {"id": 1, "name": "y"}, "region": "eu", "extra": 2})
    c = await Nested.enqueue({"account": {"id": 2}, "region": "eu"})
    assert b.conflicted and b.id == a.id and not c.conflicted
    # fields=["args"] only: another worker in another queue with the same key args is a duplicate.
    d = await NestedElsewhere.enqueue({"account": {"id": 1}, "region": "eu"})
    assert d.conflicted and d.id == a.id
    # Numbers compare by value: 1.0 == 1; booleans are not numbers.
    e = await Nested.enqueue({"account": {"id": 1.0}, "region": "eu"})
    f = await Nested.enqueue({"account": {"id": True}, "region": "eu"})
    assert e.conflicted and not f.conflicted


async def test_meta_field(oban: Oban) -> None:
    opts = {"fields": ["worker", "meta"], "keys": ["tenant"]}
    a = await MyWorker.enqueue({"a": 1}, meta={"tenant": "t1", "trace": "x"}, unique=opts)
    b = await MyWorker.enqueue({"a": 2}, meta={"tenant": "t1", "trace": "y"}, unique=opts)
    c = await MyWorker.enqueue({"a": 1}, meta={"tenant": "t2"}, unique=opts)
    assert b.conflicted and b.id == a.id and not c.conflicted


@worker(unique=True)
class CustomKey(Worker):
    @staticmethod
    def unique_key(job: Job[Any]) -> Any:
        return ["custom", job.args["order"]]

    async def process(self, job: Job[Any]) -> None:
        pass


async def test_custom_key_function(oban: Oban) -> None:
    a = await CustomKey.enqueue({"order": 5, "note": "a"})
    b = await CustomKey.enqueue({"order": 5, "note": "b"})
    assert b.conflicted and b.id == a.id
    key_fn = {"key": lambda job: job.args["email"].lower()}
    c = await MyWorker.enqueue({"email": "Ada@Example.com"}, unique=key_fn)
    d = await MyWorker.enqueue({"email": "ada@example.com"}, unique=key_fn)
    assert d.conflicted and d.id == c.id
    with pytest.raises(ValidationError, match=r"unique\.key"):
        await MyWorker.enqueue({"email": "x"}, unique={"key": lambda job: {1, 2}})


# -- exact windows --------------------------------------------------------------------------------


async def test_period_counts_from_scheduled_at(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    now = datetime.now(timezone.utc)
    opts = {"period": 2}
    within = await oban.insert(MyWorker.new({"w": 1}, unique=opts, scheduled_at=now - timedelta(seconds=1.5)))
    assert (await oban.insert(MyWorker.new({"w": 1}, unique=opts))).id == within.id
    expired = await oban.insert(
        MyWorker.new({"w": 2}, unique=opts, scheduled_at=now - timedelta(seconds=2.1))
    )
    fresh = await oban.insert(MyWorker.new({"w": 2}, unique=opts))
    assert not fresh.conflicted and fresh.id != expired.id
    # The expired holder gave its key up for good (and is otherwise untouched).
    assert await db.fetchval(f'SELECT unique_states FROM "{prefix}".oban_jobs WHERE id = $1', expired.id) == 0
    # A job scheduled in an hour with period 600 holds its key for 70 minutes.
    later = await oban.insert(MyWorker.new({"w": 3}, unique={"period": 600}, schedule_in=3600))
    row = await db.fetchrow(
        f'SELECT scheduled_at, unique_expires_at FROM "{prefix}".oban_jobs WHERE id = $1', later.id
    )
    assert row["unique_expires_at"] - row["scheduled_at"] == timedelta(seconds=600)
    assert (await oban.insert(MyWorker.new({"w": 3}, unique={"period": 600}))).id == later.id


async def test_window_in_real_time(oban: Oban) -> None:
    holder = await oban.insert(MyWorker.new({"rt": 1}, unique={"period": 2}))
    await asyncio.sleep(1.5)
    assert (await oban.insert(MyWorker.new({"rt": 1}, unique={"period": 2}))).id == holder.id
    await asyncio.sleep(0.6)  # 2.1 s after the holder
    replacement = await oban.insert(MyWorker.new({"rt": 1}, unique={"period": 2}))
    assert not replacement.conflicted and replacement.id != holder.id


async def test_sweep_releases_expired_keys(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=10)
    jobs = await oban.insert_all(
        [MyWorker.new({"s": i}, unique={"period": 5}, scheduled_at=past) for i in range(3)]
        + [MyWorker.new({"s": "live"}, unique={"period": 60})]
    )
    assert await oban.driver.execute("job_unique_sweep", limit=100) == "UPDATE 3"
    masks = await db.fetch(f'SELECT id, unique_states FROM "{prefix}".oban_jobs ORDER BY id')
    assert [r["unique_states"] for r in masks if r["id"] != jobs[-1].id] == [0, 0, 0]


# -- groups and until, moved through the engine's own transitions -------------------------------------

INSTANCE = str(uuid.uuid4())


async def _fetch(oban: Oban, queue: str = "default") -> Any:
    rows = await claim_jobs(oban.driver, None, [Target(queue)], 1, node="t", instance=INSTANCE)
    return rows[0]


async def _ack(oban: Oban, row: Any, state: str, delay: float | None = None) -> None:
    rows = await oban.driver.fetch(
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
    parked = [r["id"] for r in rows if r["parked"]]
    if parked:
        await parking.unpark(oban.driver, parked)


async def _blocks(oban: Oban, args: dict[str, Any], unique: dict[str, Any]) -> bool:
    probe = await oban.insert(MyWorker.new(args, unique=unique))
    if not probe.conflicted:
        await oban.delete_job(probe.id)  # type: ignore[arg-type]
    return probe.conflicted


CASES = {
    # name: (unique options, expected "blocks duplicates?" in: available, executing, then per final state)
    "successful": (
        {},
        True,
        True,
        {"completed": True, "retryable": True, "discarded": False, "cancelled": False},
    ),
    "incomplete": (
        {"group": "incomplete"},
        True,
        True,
        {"completed": False, "retryable": True, "discarded": False, "cancelled": False},
    ),
    "all": (
        {"group": "all"},
        True,
        True,
        {"completed": True, "retryable": True, "discarded": True, "cancelled": True},
    ),
    "until_success": (
        {"until": "success"},
        True,
        True,
        {"completed": False, "retryable": True, "discarded": False, "cancelled": False},
    ),
    "until_start": (
        {"until": "start"},
        True,
        False,
        {"completed": False, "retryable": False, "discarded": False, "cancelled": False},
    ),
    "explicit": (
        {"group": ["available", "executing", "completed"]},
        True,
        True,
        {"completed": True, "retryable": False, "discarded": False, "cancelled": False},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("final", ["completed", "retryable", "discarded", "cancelled"])
async def test_groups_and_until(oban: Oban, case: str, final: str) -> None:
    options, in_available, in_executing, finals = CASES[case]
    args = {"case": case, "final": final}
    await oban.insert(MyWorker.new(args, unique=options))
    assert await _blocks(oban, args, options) is in_available
    row = await _fetch(oban)
    assert await _blocks(oban, args, options) is in_executing
    await _ack(oban, row, final, delay=0 if final == "retryable" else None)
    assert await _blocks(oban, args, options) is finals[final]


async def test_until_start_never_retakes_the_key(oban: Oban) -> None:
    args, opts = {"u": 1}, {"until": "start"}
    first = await oban.insert(MyWorker.new(args, unique=opts))
    row = await _fetch(oban)
    await _ack(oban, row, "retryable", delay=0)
    await oban.driver.fetch("job_stage", channel="x", limit=10)  # back to available
    assert (await oban.get_job(first.id)).state is JobState.AVAILABLE  # type: ignore[arg-type]
    assert not await _blocks(oban, args, opts)


async def test_scheduled_group_debounce_with_replace(oban: Oban) -> None:
    opts = {"group": "scheduled", "period": 60, "replace": {"scheduled": ["scheduled_at", "args"]}}
    first = await oban.insert(MyWorker.new({"id": 1, "v": 1}, unique=opts, schedule_in=10))
    second = await oban.insert(MyWorker.new({"id": 1, "v": 1}, unique=opts, schedule_in=20))
    assert second.conflicted and second.id == first.id
    assert second.scheduled_at is not None and first.scheduled_at is not None
    assert 9 < (second.scheduled_at - first.scheduled_at).total_seconds() < 11
    stored = await oban.get_job(first.id)  # type: ignore[arg-type]
    assert stored.scheduled_at == second.scheduled_at and stored.state is JobState.SCHEDULED
    # Not scheduled any more -> not in the group -> no conflict, nothing replaced.
    now = await oban.insert(MyWorker.new({"id": 2}, unique=opts))
    assert not (await oban.insert(MyWorker.new({"id": 2}, unique=opts))).conflicted
    assert (await oban.get_job(now.id)).scheduled_at == now.scheduled_at  # type: ignore[arg-type]


async def test_replace_only_in_listed_states(oban: Oban) -> None:
    opts = {"replace": {"available": ["args", "priority", "tags", "meta", "max_attempts"]}, "keys": ["id"]}
    first = await oban.insert(MyWorker.new({"id": 1, "v": "old"}, unique=opts))
    second = await oban.insert(
        MyWorker.new(
            {"id": 1, "v": "new"}, unique=opts, priority=3, tags=["x"], meta={"m": 1}, max_attempts=2
        )
    )
    assert second.conflicted and second.id == first.id
    stored = await oban.get_job(first.id)  # type: ignore[arg-type]
    assert (stored.args, stored.priority, stored.tags, stored.meta, stored.max_attempts) == (
        {"id": 1, "v": "new"},
        3,
        ["x"],
        {"m": 1},
        2,
    )
    await _fetch(oban)  # executing: not a replace state
    third = await oban.insert(MyWorker.new({"id": 1, "v": "newest"}, unique=opts))
    assert third.conflicted and third.args == {"id": 1, "v": "new"}


# -- transitions never wedge (Oban #1416) ------------------------------------------------------------


@worker(queue="wedge", max_attempts=3, unique={"group": ["available", "scheduled", "executing"]})
class FailsOnce(Worker):
    def backoff(self, job: Job[Any]) -> float:
        return 0.5

    async def process(self, job: Job[Any]) -> None:
        if job.args.get("fail") and job.attempt == 1:
            raise RuntimeError("first attempt fails")


async def test_retry_into_a_held_key_is_cancelled_not_wedged(make_oban: Any, oban: Oban) -> None:
    runner = await make_oban(queues={"wedge": 2})
    a = await oban.insert(FailsOnce.new({"k": 1, "fail": True}, unique={"keys": ["k"]}))
    await wait_for(lambda: _state(oban, a.id, JobState.RETRYABLE))
    # While A waits in retryable (outside its group), B takes the key.
    b = await oban.insert(FailsOnce.new({"k": 1}, unique={"keys": ["k"]}, schedule_in=30))
    assert not b.conflicted
    other = await oban.insert(FailsOnce.new({"k": 2}, schedule_in=0.6))
    # The stager moves A back to available: it must not fail, stall, or give A the key.
    await wait_for(lambda: _state(oban, a.id, JobState.CANCELLED), timeout=10)
    cancelled = await oban.get_job(a.id)  # type: ignore[arg-type]
    assert cancelled.meta["unique_conflict"]["holder"] == b.id
    assert cancelled.meta["unique_conflict"]["outcome"] == "cancelled"
    await wait_for(lambda: _state(oban, other.id, JobState.COMPLETED), timeout=10)  # staging went on
    assert (await oban.get_job(b.id)).state is JobState.SCHEDULED  # type: ignore[arg-type]
    assert runner.node is not None


async def _state(oban: Oban, job_id: int | None, state: JobState) -> bool:
    return (await oban.get_job(job_id)).state is state  # type: ignore[arg-type]


@worker(queue="snooze", unique={"group": "scheduled", "keys": ["k"]})
class SnoozesOnce(Worker):
    async def process(self, job: Job[Any]) -> Snooze | None:
        if not job.meta.get("snoozed"):
            await asyncio.sleep(0.3)  # time for a new scheduled job to take the key meanwhile
            return Snooze(5)
        return None


async def test_snooze_into_a_held_scheduled_key(make_oban: Any, oban: Oban) -> None:
    await make_oban(queues={"snooze": 1})
    a = await oban.insert(SnoozesOnce.new({"k": 1}))  # available: not in the `scheduled` group
    await wait_for(lambda: _state(oban, a.id, JobState.EXECUTING))
    b = await oban.insert(SnoozesOnce.new({"k": 1}, schedule_in=60))
    assert not b.conflicted
    await wait_for(lambda: _state(oban, a.id, JobState.CANCELLED), timeout=5)
    assert (await oban.get_job(a.id)).meta["unique_conflict"]["holder"] == b.id  # type: ignore[arg-type]
    c = await oban.insert(SnoozesOnce.new({"k": 1}, schedule_in=60))
    assert c.conflicted and c.id == b.id


async def test_snooze_without_competition_keeps_the_key(make_oban: Any, oban: Oban) -> None:
    await make_oban(queues={"snooze": 1})
    a = await oban.insert(SnoozesOnce.new({"k": 2}))
    await wait_for(lambda: _state(oban, a.id, JobState.SCHEDULED))
    dup = await oban.insert(SnoozesOnce.new({"k": 2}, schedule_in=60))
    assert dup.conflicted and dup.id == a.id


async def test_manual_retry_names_the_holder(oban: Oban) -> None:
    a = await oban.insert(MyWorker.new({"r": 1}))
    row = await _fetch(oban)
    await _ack(oban, row, "discarded")
    b = await oban.insert(MyWorker.new({"r": 1}))
    assert not b.conflicted
    with pytest.raises(UniqueConflict) as info:
        await oban.retry_job(a.id)  # type: ignore[arg-type]
    assert info.value.holder_id == b.id and info.value.job_id == a.id and f"job {b.id}" in str(info.value)
    assert (await oban.get_job(a.id)).state is JobState.DISCARDED  # type: ignore[arg-type]
    other = await oban.insert(MyWorker.new({"r": 2}, schedule_in=60))
    with pytest.raises(UniqueConflict):
        await oban.retry_jobs([other.id, a.id])  # type: ignore[list-item]
    assert (await oban.get_job(other.id)).state is JobState.SCHEDULED  # all or nothing  # type: ignore[arg-type]
    await oban.delete_job(b.id)  # type: ignore[arg-type]
    assert await oban.retry_job(a.id) is True  # type: ignore[arg-type]
    assert (await oban.insert(MyWorker.new({"r": 1}))).id == a.id


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"fields": ["args", "kind"]}, "unique.fields"),
        ({"fields": "args"}, "unique.fields"),
        ({"fields": []}, "unique.fields"),
        ({"group": "finished"}, "unique.group"),
        ({"group": ["available", "done"]}, "unique.group"),
        ({"group": ["executing"]}, "unique"),
        ({"keys": ["id"], "fields": ["worker", "queue"]}, "unique"),
        ({"period": 0}, "unique.period"),
        ({"period": -5}, "unique.period"),
        ({"period": "soon"}, "unique.period"),
        ({"until": "finish"}, "unique.until"),
        ({"replace": {"scheduled": ["worker"]}}, "unique.replace.scheduled"),
        ({"replace": {"later": ["args"]}}, "unique.replace"),
        ({"perod": 5}, "unique.perod"),
    ],
)
async def test_bad_options_raise_before_writing(
    oban: Oban, db: asyncpg.Connection, prefix: str, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(UniqueOptionsError) as info:
        await oban.insert_all([MyWorker.new({"ok": 1}), MyWorker.new({"id": 1}, unique=options)])
    assert info.value.field == field
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs') == 0


async def test_missing_key_path_is_an_error(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    with pytest.raises(UniqueOptionsError, match="key path not found") as info:
        await oban.insert_all([MyWorker.new({"ok": 1}), Nested.new({"account": {}, "region": "eu"})])
    assert info.value.value == "account.id"
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs') == 0


def test_options_model() -> None:
    assert UniqueOptions().states == frozenset(
        {"scheduled", "available", "executing", "retryable", "completed"}
    )
    assert UniqueOptions.parse(True) == UniqueOptions()
    assert UniqueOptions.parse(False) is None
    assert UniqueOptions.parse({"period": timedelta(minutes=2)}).period == 120  # type: ignore[union-attr]
    assert UniqueOptions.parse({"period": "infinity"}).period is None  # type: ignore[union-attr]
    base = UniqueOptions.parse({"keys": ["a"], "period": 10})
    assert UniqueOptions.parse({"period": 20}, base=base).keys == ("a",)  # type: ignore[union-attr]


async def test_retrying_two_jobs_that_share_a_key(oban: Oban) -> None:
    opts = {"group": "incomplete"}
    first = await oban.insert(MyWorker.new({"pair": 1}, unique=opts))
    await _ack(oban, await _fetch(oban), "completed")  # leaves the group: the key is free
    second = await oban.insert(MyWorker.new({"pair": 1}, unique=opts))
    assert not second.conflicted
    await _ack(oban, await _fetch(oban), "completed")
    with pytest.raises(UniqueConflict) as info:
        await oban.retry_jobs([first.id, second.id])  # type: ignore[list-item]
    assert (info.value.job_id, info.value.holder_id) == (second.id, first.id)
    states = [j.state for j in await oban.get_jobs([first.id, second.id])]  # type: ignore[list-item]
    assert states == [JobState.COMPLETED, JobState.COMPLETED]
