"""Job management from the API: list_jobs (filters, keyset pages, the index behind each filter),
update_job(s), and the filtered forms of get/retry/cancel/delete."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from oban_py import Job, JobState, Oban, Worker, worker
from oban_py.db.sql import Queries
from oban_py.errors import JobNotFound, UniqueConflict, ValidationError
from oban_py.job_query import JobFilter

pytestmark = pytest.mark.anyio


@worker(queue="admin")
class AdminJob(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


@worker(queue="admin", unique={"keys": ["k"], "group": ["available"]})
class AdminUnique(Worker):
    async def process(self, job: Job[Any]) -> None:
        pass


# One row per state for the rare values, among a few thousand completed and available "bulk" jobs: a
# selective filter then has to find its rows through an index to be fast, and the planner knows it.
SEED = """
INSERT INTO {t} (queue, worker, state, args, completed_at, attempted_at)
SELECT 'bulk', 'Bulk', 'completed', jsonb_build_object('n', i), now(), now() FROM generate_series(1, 5000) i;
INSERT INTO {t} (queue, worker, state, args)
SELECT 'bulk', 'Bulk', 'available', jsonb_build_object('n', i) FROM generate_series(1, 500) i;
INSERT INTO {t} (queue, worker, state, args, tags, completed_at, discarded_at, cancelled_at, attempted_at)
SELECT 'rare', 'Rare', s, '{{"user_id": 7, "kind": "x"}}', '{{billing}}', now(), now(), now(), now()
FROM unnest(enum_range(NULL::{p}.oban_job_state)) AS s, generate_series(1, 3);
ANALYZE {t};
"""


async def seed(db: asyncpg.Connection, prefix: str) -> None:
    await db.execute(SEED.format(t=f'"{prefix}".oban_jobs', p=f'"{prefix}"'))


async def test_each_filter_reads_through_an_index(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    await seed(db, prefix)
    query = Queries(prefix)["job_list"]
    base = dict(
        hot=True, cold=True, match_states=None, match_queue=None, match_worker=None, match_args=None,
        match_tags=None, match_ids=None, before_id=None, limit=51,
    )  # fmt: skip
    cases: dict[str, tuple[dict[str, Any], set[str]]] = {
        "queue": ({"match_queue": "rare"}, {"oban_jobs_queue_idx", "oban_jobs_fetch_idx"}),
        "worker": ({"match_worker": "Rare"}, {"oban_jobs_worker_idx"}),
        "args_contains": ({"match_args": '{"user_id": 7}'}, {"oban_jobs_args_idx"}),
        "tags": ({"match_tags": ["billing"]}, {"oban_jobs_tags_idx"}),
        "state": ({"match_states": ["discarded"], "hot": False}, {"oban_jobs_failed_idx"}),
        "state retryable": ({"match_states": ["retryable"], "hot": False}, {"oban_jobs_failed_idx"}),
        "state available": ({"match_states": ["available"], "cold": False}, {"oban_jobs_fetch_idx"}),
        "queue and state": ({"match_queue": "rare", "match_states": ["cancelled"], "hot": False}, set()),
    }
    for name, (params, indexes) in cases.items():
        async with db.transaction():
            await db.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            await db.execute(f'SET LOCAL search_path = "{prefix}"')
            text = await db.fetchval("EXPLAIN (FORMAT JSON) " + query.text, *query.args({**base, **params}))
        used = _nodes(json.loads(text)[0]["Plan"])
        assert not any(kind == "Seq Scan" for kind, _ in used), (name, used)
        names = {index for _, index in used if index}
        assert names and names <= _ALL_INDEXES, (name, used)
        assert indexes <= names, (name, used)


_ALL_INDEXES = {
    "oban_jobs_queue_idx", "oban_jobs_worker_idx", "oban_jobs_args_idx", "oban_jobs_tags_idx",
    "oban_jobs_failed_idx", "oban_jobs_fetch_idx", "oban_jobs_executing_idx", "oban_jobs_staging_idx",
    "oban_jobs_pkey",
}  # fmt: skip


def _nodes(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    found = [(plan["Node Type"], plan.get("Index Name"))]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


async def test_every_filter_and_pages(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    await seed(db, prefix)
    rare = await oban.list_jobs(queue="rare", limit=100)
    assert len(rare.jobs) == 21 and rare.next_before_id is None
    ids = [j.id or 0 for j in rare.jobs]
    assert ids == sorted(ids, reverse=True)  # newest first
    assert {j.state for j in rare.jobs} == set(JobState)
    assert len((await oban.list_jobs(worker="Rare", limit=100)).jobs) == 21
    assert len((await oban.list_jobs(args_contains={"user_id": 7}, limit=100)).jobs) == 21
    assert (await oban.list_jobs(args_contains={"user_id": 8})).jobs == []
    assert len((await oban.list_jobs(tags=["billing"], limit=100)).jobs) == 21
    assert len((await oban.list_jobs(state="discarded", limit=100)).jobs) == 3
    both = await oban.list_jobs(state=["available", "cancelled"], queue="rare")
    assert sorted(j.state.value for j in both.jobs) == ["available"] * 3 + ["cancelled"] * 3
    assert len((await oban.list_jobs(state=JobState.EXECUTING, worker="Rare")).jobs) == 3

    # Keyset pages: 5521 jobs, 1000 a page, each page below the last, every job exactly once.
    seen: list[int] = []
    before = None
    while True:
        page = await oban.list_jobs(limit=1000, before_id=before)
        seen += [j.id or 0 for j in page.jobs]
        if page.next_before_id is None:
            break
        assert page.next_before_id == page.jobs[-1].id
        before = page.next_before_id
    assert len(seen) == len(set(seen)) == 5521 and seen == sorted(seen, reverse=True)


async def test_bad_filters_name_the_field(oban: Oban) -> None:
    for kwargs, field in [
        ({"state": "done"}, "state"),
        ({"limit": 0}, "limit"),
        ({"limit": 10_001}, "limit"),
        ({"args_contains": [1]}, "args_contains"),
        ({"tags": "billing"}, "tags"),
        ({"queue": ""}, "queue"),
        ({"before_id": -1}, "ids"),
    ]:
        with pytest.raises(ValidationError) as caught:
            await oban.list_jobs(**kwargs)
        assert caught.value.field == field, kwargs
    with pytest.raises(ValidationError, match="give job ids or at least one filter"):
        await oban.retry_jobs()


async def _table(db: asyncpg.Connection, prefix: str) -> list[tuple[Any, ...]]:
    rows = await db.fetch(
        f'SELECT id, state::text, queue, priority, meta FROM "{prefix}".oban_jobs ORDER BY id'
    )
    return [tuple(r) for r in rows]


async def test_empty_filters_are_refused_and_write_nothing(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await seed(db, prefix)
    before = await _table(db, prefix)
    empties: list[tuple[dict[str, Any], str]] = [
        ({"tags": []}, "tags"),
        ({"args_contains": {}}, "args_contains"),
        ({"state": []}, "state"),
        ({"queue": ""}, "queue"),
        ({"worker": ""}, "worker"),
        ({"tags": [], "args_contains": {}}, "args_contains"),
    ]
    for kwargs, field in empties:
        calls = {
            "delete_jobs": lambda kw=kwargs: oban.delete_jobs(**kw),
            "cancel_jobs": lambda kw=kwargs: oban.cancel_jobs(reason="x", **kw),
            "retry_jobs": lambda kw=kwargs: oban.retry_jobs(**kw),
            "get_jobs": lambda kw=kwargs: oban.get_jobs(**kw),
            "list_jobs": lambda kw=kwargs: oban.list_jobs(**kw),
            "update_jobs": lambda kw=kwargs: oban.update_jobs(JobFilter(**kw), priority=9),
        }
        for name, call in calls.items():
            with pytest.raises(ValidationError) as caught:
                await call()
            assert caught.value.field == field, (name, kwargs)
        with pytest.raises(ValidationError) as caught:
            JobFilter(**kwargs).empty  # noqa: B018 - the property validates
        assert caught.value.field == field, kwargs
    assert await _table(db, prefix) == before  # nothing written

    # A nested empty object is a real filter (args has that key, holding an object), not "every job".
    assert await oban.delete_jobs(args_contains={"user_id": {}}) == 0
    assert await _table(db, prefix) == before


# Each action, on rows of queue "racing" that match its filter; job X stops matching right after the
# select (`change` on X), either committed before the action runs or while the action waits on X's lock.
RACES: dict[str, tuple[str, str, Any]] = {
    # a completed job that was retried and started meanwhile must not be deleted (its body interrupted)
    "delete": ("completed", "state = 'executing', attempted_at = now(), attempt = attempt + 1",
               lambda o: o.delete_jobs(state="completed", queue="racing")),
    "cancel": ("scheduled", "queue = 'elsewhere'",
               lambda o: o.cancel_jobs(state="scheduled", queue="racing", reason="x")),
    "retry": ("discarded", "queue = 'elsewhere'", lambda o: o.retry_jobs(state="discarded", queue="racing")),
    "update": ("scheduled", "queue = 'elsewhere'",
               lambda o: o.update_jobs(JobFilter(state="scheduled", queue="racing"), priority=7)),
}  # fmt: skip


@pytest.mark.parametrize("timing", ["committed", "locked"])
@pytest.mark.parametrize("action", sorted(RACES))
async def test_filtered_actions_leave_a_row_that_stopped_matching(
    oban: Oban, db: asyncpg.Connection, prefix: str, monkeypatch: pytest.MonkeyPatch, action: str, timing: str
) -> None:
    import oban_py.api.jobs as api_jobs

    state, change, act = RACES[action]
    table = f'"{prefix}".oban_jobs'
    ids = [
        r["id"]
        for r in await db.fetch(
            f"INSERT INTO {table} (queue, worker, state, args, scheduled_at, completed_at, discarded_at) "
            f"SELECT 'racing', 'Racing', $1::text::\"{prefix}\".oban_job_state, jsonb_build_object('i', i), "
            "now() + interval '1 hour', now(), now() FROM generate_series(1, 3) AS i RETURNING id",
            state,
        )
    ]
    x = ids[1]
    original = api_jobs.matching_ids
    committer: list[asyncio.Task[None]] = []

    async def select_then_change(driver: Any, where: JobFilter, conn: Any = None) -> list[int]:
        found = await original(driver, where, conn)
        assert found == ids
        if timing == "committed":
            await db.execute(f"UPDATE {table} SET {change} WHERE id = $1", x)
        else:  # X changes in a transaction that holds its lock until the action is waiting on it
            tx = db.transaction()
            await tx.start()
            await db.execute(f"UPDATE {table} SET {change} WHERE id = $1", x)

            async def commit_later() -> None:
                await asyncio.sleep(0.5)
                await tx.commit()

            committer.append(asyncio.create_task(commit_later()))
        return found

    monkeypatch.setattr(api_jobs, "matching_ids", select_then_change)
    x_before = await db.fetchrow(f"SELECT * FROM {table} WHERE id = $1", x)
    assert await act(oban) == 2
    for task in committer:
        await task
    x_after = await db.fetchrow(f"SELECT * FROM {table} WHERE id = $1", x)
    assert x_after is not None and x_before is not None
    untouched = {
        k: v for k, v in dict(x_after).items() if k not in ("queue", "state", "attempted_at", "attempt")
    }
    assert untouched == {k: v for k, v in dict(x_before).items() if k in untouched}  # only `change` applied
    others = await db.fetch(f"SELECT id, state::text, priority FROM {table} WHERE id <> $1 ORDER BY id", x)
    expected = {"delete": [], "cancel": ["cancelled"] * 2, "retry": ["available"] * 2, "update": [state] * 2}
    assert [r["state"] for r in others] == expected[action]
    if action == "update":
        assert [r["priority"] for r in others] == [7, 7]


async def test_filtered_retry_cancel_delete_get(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    await seed(db, prefix)
    assert await oban.retry_jobs(state="discarded", queue="rare") == 3
    assert len(await oban.get_jobs(state="discarded")) == 0
    assert await oban.cancel_jobs(state="scheduled", worker="Rare", reason="no") == 3
    got = await oban.get_jobs(worker="Rare", state="cancelled")
    assert len(got) == 6 and got == sorted(got, key=lambda j: -(j.id or 0))
    assert await oban.delete_jobs(args_contains={"kind": "x"}, state="cancelled") == 6
    assert await oban.delete_jobs([got[0].id or 0], queue="rare") == 0  # ids AND filters: gone already
    assert len(await oban.get_jobs([j.id or 0 for j in got])) == 0


async def test_update_job(oban: Oban) -> None:
    job = await oban.insert(AdminJob.new({"a": 1}, schedule_in=600, meta={"keep": 1}))
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    moved = await oban.update_job(
        job.id or 0, priority=3, queue="elsewhere", tags=["x", "y"], meta={"note": "moved"},
        scheduled_at=later,
    )  # fmt: skip
    assert (moved.priority, moved.queue, moved.tags, moved.state) == (3, "elsewhere", ["x", "y"], "scheduled")
    assert moved.meta == {"keep": 1, "note": "moved"} and abs(moved.scheduled_at - later) < timedelta(
        seconds=1
    )

    # Due now: available at once, and the queue hears about it.
    listener = await asyncpg.connect(oban.config.dsn)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(oban.driver.insert_channel, lambda *a: heard.put_nowait(a[3]))
    try:
        now = await oban.update_job(job.id or 0, scheduled_at=datetime.now(timezone.utc))
        assert now.state is JobState.AVAILABLE
        assert await asyncio.wait_for(heard.get(), 5) == "elsewhere"
    finally:
        await listener.close()


async def test_update_errors_name_the_field(oban: Oban) -> None:
    job = await oban.insert(AdminJob.new({}))
    for kwargs, field in [
        ({"priority": 10}, "priority"),
        ({"queue": "bad queue!"}, "queue"),
        ({"tags": [""]}, "tags"),
        ({"meta": "x"}, "meta"),
        ({"scheduled_at": datetime(2030, 1, 1)}, "scheduled_at"),
        ({}, "changes"),
    ]:
        with pytest.raises(ValidationError) as caught:
            await oban.update_job(job.id or 0, **kwargs)
        assert caught.value.field == field, kwargs
    await oban.cancel_job(job.id or 0)
    with pytest.raises(ValidationError) as caught:
        await oban.update_job(job.id or 0, priority=1)
    assert caught.value.field == "state" and caught.value.value == "cancelled"
    with pytest.raises(JobNotFound):
        await oban.update_job(999_999, priority=1)


async def test_update_jobs_by_filter_and_unique_conflict(oban: Oban) -> None:
    jobs = await oban.insert_all([AdminJob.new({"i": i}, schedule_in=600) for i in range(3)])
    assert await oban.update_jobs(JobFilter(queue="admin", state="scheduled"), priority=5) == 3
    assert {j.priority for j in await oban.get_jobs([j.id or 0 for j in jobs])} == {5}
    with pytest.raises(ValidationError, match="give job ids or at least one filter"):
        await oban.update_jobs(JobFilter(), priority=1)

    # A scheduled duplicate made due would become a second holder of the key: nothing changes.
    waiting = await oban.insert(AdminUnique.new({"k": 1}, schedule_in=600))  # holds nothing yet
    holder = await oban.insert(AdminUnique.new({"k": 1}))
    assert not waiting.conflicted and not holder.conflicted
    with pytest.raises(UniqueConflict) as caught:
        await oban.update_jobs(
            [waiting.id or 0, jobs[0].id or 0], scheduled_at=datetime.now(timezone.utc), priority=1
        )
    assert (caught.value.job_id, caught.value.holder_id) == (waiting.id, holder.id)
    assert "cannot be updated" in str(caught.value)
    assert (await oban.get_job(waiting.id or 0)).state is JobState.SCHEDULED
    assert (await oban.get_job(jobs[0].id or 0)).priority == 5  # all or nothing
    await oban.delete_job(holder.id or 0)
    assert (
        await oban.update_job(waiting.id or 0, scheduled_at=datetime.now(timezone.utc))
    ).state == "available"
