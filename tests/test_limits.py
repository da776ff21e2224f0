"""Concurrency controls in one process: keyed limits, skip/solo, groups, selections, visibility, options."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import pytest

from oban_py import Job, JobState, Oban, Worker, load_config, worker
from oban_py.errors import ConfigError, LimitOptionsError, ValidationError

from helpers import duty_runs, states, wait_for

pytestmark = pytest.mark.anyio

running: Counter[str] = Counter()
ALL = "(all keys)"  # peak[ALL]: the most bodies running at once, whatever their keys
peak: Counter[str] = Counter()
order: list[Any] = []
skipped: list[int] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    running.clear()
    peak.clear()
    order.clear()
    skipped.clear()


async def body(key: str, seconds: float = 0.1) -> None:
    running[key] += 1
    peak[key] = max(peak[key], running[key])
    peak[ALL] = max(peak[ALL], sum(running.values()))
    try:
        await asyncio.sleep(seconds)
    finally:
        running[key] -= 1


@worker(queue="keyed", limit={"key": "account", "to": 2})
class PerAccount(Worker):
    async def process(self, job: Job[Any]) -> None:
        await body(str(job.args["account"]), job.args.get("sleep", 0.1))


@worker(queue="keyed", solo=True)
class Solo(Worker):
    def on_skip(self, job: Job[Any]) -> None:
        skipped.append(job.id)  # type: ignore[arg-type]

    async def process(self, job: Job[Any]) -> None:
        await body("solo", 0.3)


@worker(queue="keyed", limit={"key": "user.id", "group": "users", "to": 1})
class UserA(Worker):
    async def process(self, job: Job[Any]) -> None:
        await body(f"user-{job.args['user']['id']}", 0.2)


@worker(queue="other", limit={"key": "user.id", "group": "users", "to": 1})
class UserB(Worker):
    async def process(self, job: Job[Any]) -> None:
        await body(f"user-{job.args['user']['id']}", 0.2)


@worker(queue="rt")
class Ordered(Worker):
    async def process(self, job: Job[Any]) -> None:
        order.append((job.queue, job.args["n"]))
        await asyncio.sleep(0.01)


async def done(db: asyncpg.Connection, prefix: str, n: int, state: str = "completed") -> bool:
    return (await states(db, prefix)).get(state, 0) >= n


async def test_keyed_limit_blocks_and_is_visible(make_oban: Any, db: asyncpg.Connection, prefix: str) -> None:
    runner = await make_oban(queues={"keyed": 10})
    await runner.insert_all([PerAccount.new({"account": a, "sleep": 0.3}) for a in (1, 1, 1, 1, 1, 2)])
    await wait_for(lambda: running["1"] == 2)
    overview = await runner.check_queues()
    lim = {status.key: status for status in overview.limits}
    key = f"{PerAccount.__oban_worker__.name}:1"
    assert lim[key].running == 2 and lim[key].waiting == 3 and lim[key].limit == 2 and lim[key].blocked
    assert overview.blocked_jobs == 3
    queue = overview.queue("keyed")
    assert queue is not None and queue.executing == 3 and queue.available == 3
    assert [n.limit for n in queue.nodes] == [10]
    await wait_for(lambda: done(db, prefix, 6), timeout=10)
    assert peak["1"] == 2 and peak["2"] == 1


async def test_skip_runs_on_skip_and_solo(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(queues={"keyed": 5})
    first = await oban.insert(Solo.new({"same": 1}))
    await wait_for(lambda: running["solo"] == 1)
    second = await oban.insert(Solo.new({"same": 1}))
    other = await oban.insert(Solo.new({"same": 2}))
    await wait_for(lambda: skipped == [second.id], timeout=5)
    job = await oban.get_job(second.id)  # type: ignore[arg-type]
    assert job.state is JobState.CANCELLED and job.meta["skipped"]["reason"] == "limit"
    await wait_for(lambda: done(db, prefix, 2), timeout=5)
    assert (await oban.get_job(first.id)).state is JobState.COMPLETED  # type: ignore[arg-type]
    assert (await oban.get_job(other.id)).state is JobState.COMPLETED  # type: ignore[arg-type]


async def test_group_is_shared_by_workers_and_queues(make_oban: Any, oban: Oban, db: asyncpg.Connection,
                                                      prefix: str) -> None:  # fmt: skip
    await make_oban(queues={"keyed": 5, "other": 5})
    await oban.insert_all(
        [UserA.new({"user": {"id": 7}}), UserB.new({"user": {"id": 7}}), UserA.new({"user": {"id": 8}})]
    )
    await wait_for(lambda: done(db, prefix, 3), timeout=10)
    assert peak["user-7"] == 1 and peak["user-8"] == 1


async def test_head_of_line_blocking_does_not_starve_other_keys(make_oban: Any, oban: Oban) -> None:
    blocked = [PerAccount.new({"account": "busy", "sleep": 2}) for _ in range(300)]
    await oban.insert_all(blocked)
    late = await oban.insert(PerAccount.new({"account": "free", "sleep": 0.01}))
    await make_oban(queues={"keyed": 10})
    await wait_for(lambda: _state(oban, late.id, JobState.COMPLETED), timeout=5)
    assert running["busy"] == 2


async def _state(oban: Oban, job_id: int | None, state: JobState) -> bool:
    return (await oban.get_job(job_id)).state is state  # type: ignore[arg-type]


async def test_ordered_selection_drains_first_queue_first(make_oban: Any, oban: Oban) -> None:
    await oban.insert_all([Ordered.new({"n": n}, queue="background") for n in range(5)])
    await oban.insert_all([Ordered.new({"n": n}, queue="real_time") for n in range(5)])
    await make_oban(queues={"interactive": {"queues": ["real_time", "background"], "limit": 1}})
    await wait_for(lambda: len(order) == 10, timeout=10)
    assert [q for q, _ in order] == ["real_time"] * 5 + ["background"] * 5


async def test_wildcard_selection_finds_new_queues(make_oban: Any, oban: Oban) -> None:
    await oban.insert_all([Ordered.new({"n": 1}, queue="mail_b"), Ordered.new({"n": 2}, queue="mail_a")])
    await oban.insert(Ordered.new({"n": 3}, queue="other"))
    runner = await make_oban(queues={"mail*": 1})
    await wait_for(lambda: len(order) == 2, timeout=5)
    assert order == [("mail_a", 2), ("mail_b", 1)]  # alphabetical within a wildcard
    await runner.insert(Ordered.new({"n": 4}, queue="mail_new"))
    await wait_for(lambda: ("mail_new", 4) in order, timeout=5)
    await duty_runs(runner, "poller")  # the poller re-resolved the patterns against every queue
    assert ("other", 3) not in order


@worker(queue="partitioned")
class PerTenant(Worker):
    async def process(self, job: Job[Any]) -> None:
        order.append(job.args["tenant"])


async def test_rate_limit_by_partition(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await oban.insert_all([PerTenant.new({"tenant": t}) for t in ("a", "b") for _ in range(6)])
    runner = await make_oban(
        queues={"partitioned": {"limit": 10, "rate_limit": {"allowed": 2, "period": 60, "by": "args.tenant"}}}
    )
    await wait_for(lambda: len(order) == 4, timeout=5)
    await duty_runs(runner, "poller")  # the producer was woken for the jobs left, twice
    assert sorted(order) == ["a", "a", "b", "b"]  # two starts per tenant per minute


async def test_global_limit_override_at_runtime(make_oban: Any, oban: Oban, db: asyncpg.Connection,
                                                prefix: str) -> None:  # fmt: skip
    runner = await make_oban(queues={"keyed": {"limit": 5, "global_limit": 5}})
    assert runner.queue_states()["keyed"].global_limits == {"keyed": 5}
    await oban.scale_queue("keyed", global_limit=2)
    await wait_for(lambda: runner.queue_states()["keyed"].global_limits == {"keyed": 2}, timeout=3)
    await oban.insert_all([PerAccount.new({"account": n, "sleep": 0.3}) for n in range(6)])
    await wait_for(lambda: done(db, prefix, 6), timeout=10)
    assert peak[ALL] == 2  # reached, never exceeded, over the whole run


# -- bad options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"limit": {"to": 0}}, "limit.to"),
        ({"limit": {"to": "two"}}, "limit.to"),
        ({"limit": {"key": "", "to": 1}}, "limit.key"),
        ({"limit": {"per": "x"}}, "limit.per"),
        ({"limit": {"on_conflict": "drop"}}, "limit.on_conflict"),
        ({"limit": "account"}, "limit"),
        ({"solo": {"to": 3}}, "solo.to"),
        ({"solo": "yes"}, "solo"),
        ({"solo": True, "limit": {"to": 1}}, "solo"),
    ],
)
def test_bad_limit_options(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:

        @worker(**options)
        class Bad:
            async def process(self, job: Job[Any]) -> None: ...

    assert info.value.field == field


async def test_missing_key_path_is_an_error(oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    with pytest.raises(LimitOptionsError, match="key path not found") as info:
        await oban.insert_all([PerAccount.new({"account": 1}), PerAccount.new({"other": 1})])
    assert info.value.value == "account"
    assert await db.fetchval(f'SELECT count(*) FROM "{prefix}".oban_jobs') == 0


@pytest.mark.parametrize(
    ("queues", "key"),
    [
        ({"q": {"rate_limit": {"allowed": 5, "period": 0}}}, "queues.q.rate_limit.period"),
        ({"q": {"rate_limit": {"allowed": 0, "period": 1}}}, "queues.q.rate_limit.allowed"),
        ({"q": {"rate_limit": {"allowed": 5, "period": 1, "by": "tenant"}}}, "queues.q.rate_limit.by"),
        ({"q": {"limit": 10, "global_limit": 5}}, "queues.q"),
        ({"q": {"global_limit": 0}}, "queues.q.global_limit"),
        ({"q": {"queues": []}}, "queues.q.queues"),
        ({"q": {"queues": ["a b"]}}, "queues.q.queues"),
        ({"q": {"queues": ["a"], "global_limit": 3}}, "queues.q"),
    ],
)
def test_bad_queue_limit_options(queues: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"queues": queues})
    assert info.value.key == key


async def test_bad_scale(oban: Oban) -> None:
    with pytest.raises(LimitOptionsError, match="global_limit"):
        await oban.scale_queue("q", global_limit=0)
    with pytest.raises(LimitOptionsError, match="above global_limit"):
        await oban.scale_queue("q", limit=10, global_limit=5)
    with pytest.raises(LimitOptionsError, match="every node"):
        await oban.scale_queue("q", global_limit=5, node="n1")
