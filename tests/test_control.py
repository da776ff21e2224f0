"""Job control (get/cancel/retry/delete), leadership, and queue controls."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from oban_py import Job, JobState, Oban, Worker, worker
from oban_py.db import parking
from oban_py.errors import JobNotFound
from oban_py.runtime.events import Event

from helpers import duty_runs, wait_for

pytestmark = pytest.mark.anyio

seen: dict[str, Any] = {}


@worker(queue="ctl")
class LongRunner(Worker):
    async def process(self, job: Job[Any]) -> None:
        seen["started"] = job.id
        try:
            await asyncio.sleep(30)
            seen["finished"] = True
        except asyncio.CancelledError:
            seen["interrupted"] = True
            raise


@worker(queue="ctl")
class Quick(Worker):
    async def process(self, job: Job[Any]) -> None:
        seen.setdefault("quick", []).append(job.args["i"])


@pytest.fixture(autouse=True)
def _reset() -> None:
    seen.clear()


async def test_get_job_missing(oban: Oban) -> None:
    with pytest.raises(JobNotFound, match="job 999999 does not exist"):
        await oban.get_job(999_999)
    assert await oban.get_jobs([999_999]) == []


async def test_cancel_delete_retry_set_forms(oban: Oban) -> None:
    jobs = await oban.insert_all([Quick.new({"i": i}, schedule_in=60) for i in range(4)])
    ids = [j.id for j in jobs]
    assert await oban.cancel_jobs(ids[:2], reason="changed my mind") == 2
    assert await oban.cancel_job(ids[0]) is False  # already cancelled
    cancelled = await oban.get_job(ids[0])  # type: ignore[arg-type]
    assert cancelled.state is JobState.CANCELLED and cancelled.errors[0]["error"] == "changed my mind"
    assert await oban.retry_jobs(ids[:3]) == 3
    assert [j.state for j in await oban.get_jobs(ids)] == [JobState.AVAILABLE] * 3 + [JobState.SCHEDULED]
    assert await oban.delete_jobs(ids[2:]) == 2
    assert await oban.delete_job(ids[3]) is False  # type: ignore[arg-type]
    assert [j.id for j in await oban.get_jobs(ids)] == ids[:2]


async def test_retry_runs_a_finished_job_again(
    make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    await make_oban(queues={"ctl": 2})
    done = await oban.insert(Quick.new({"i": 1}))
    await wait_for(lambda: seen.get("quick") == [1])
    await wait_for(lambda: _completed(oban, done.id))
    assert await oban.retry_job(done.id) is True  # type: ignore[arg-type]
    await wait_for(lambda: seen.get("quick") == [1, 1])


async def _completed(oban: Oban, job_id: int | None) -> bool:
    return (await oban.get_job(job_id)).state is JobState.COMPLETED  # type: ignore[arg-type]


async def test_cancelling_an_executing_job_cancels_its_task(make_oban: Any, oban: Oban) -> None:
    runner = await make_oban(queues={"ctl": 2})
    job_ = await oban.insert(LongRunner.new({}))
    await wait_for(lambda: seen.get("started") == job_.id)
    assert await oban.cancel_job(job_.id) is True  # type: ignore[arg-type]
    await wait_for(lambda: seen.get("interrupted"), timeout=3)
    assert "finished" not in seen
    # The row stays executing (holding its slot) until the body has stopped, then is cancelled.
    await wait_for(lambda: _state_of(oban, job_.id, JobState.CANCELLED), timeout=3)
    await wait_for(lambda: runner.queue_states()["ctl"].running == 0)
    # The queue goes on working.
    await oban.insert(Quick.new({"i": 7}))
    await wait_for(lambda: seen.get("quick") == [7])


async def _state_of(oban: Oban, job_id: Any, state: JobState) -> bool:
    return (await oban.get_job(job_id)).state is state


async def test_deleting_an_executing_job_cancels_its_task(make_oban: Any, oban: Oban) -> None:
    await make_oban(queues={"ctl": 2})
    job_ = await oban.insert(LongRunner.new({}))
    await wait_for(lambda: seen.get("started") == job_.id)
    assert await oban.delete_job(job_.id) is True  # type: ignore[arg-type]
    await wait_for(lambda: seen.get("interrupted"), timeout=3)
    with pytest.raises(JobNotFound):
        await oban.get_job(job_.id)  # type: ignore[arg-type]


async def test_exactly_one_leader_and_failover(make_oban: Any) -> None:
    a = await make_oban(queues={"ctl": 1}, node="a", name="a")
    b = await make_oban(queues={"ctl": 1}, node="b", name="b")
    await wait_for(lambda: a.is_leader or b.is_leader, timeout=5)
    # Exclusive after every election either node runs, over two rounds on each.
    seen_at_elections: list[tuple[bool, bool]] = []

    def check(event: Event) -> None:
        if event.name == "duty.ran" and event.data["duty"] == "leader":
            seen_at_elections.append((a.is_leader, b.is_leader))

    unsubscribe = [a.events.subscribe(check), b.events.subscribe(check)]
    await asyncio.gather(duty_runs(a, "leader"), duty_runs(b, "leader"))
    for stop in unsubscribe:
        stop()
    assert len(seen_at_elections) >= 4 and all(x != y for x, y in seen_at_elections), seen_at_elections
    leader, follower = (a, b) if a.is_leader else (b, a)
    await leader.stop()
    await wait_for(lambda: follower.is_leader, timeout=5)


async def test_pause_resume_scale(make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    runner = await make_oban(queues={"ctl": 2, "side": 1}, node="n1")

    def ctl_changed() -> asyncio.Future[Event]:
        return runner.events.next("controls.applied", lambda e: "ctl" in e.data["changed"])

    applied = ctl_changed()
    await oban.pause_queue("ctl")  # from another instance: the runner hears it by NOTIFY
    await asyncio.wait_for(applied, 3)
    assert runner.queue_states()["ctl"].paused
    held = await oban.insert(Quick.new({"i": 1}))
    # The runner had its chance: a job inserted after it in a running queue ran, and two polls passed.
    await oban.insert(Quick.new({"i": 2}, queue="side"))
    await wait_for(lambda: seen.get("quick") == [2], timeout=3)
    await duty_runs(runner, "poller")
    assert seen["quick"] == [2] and (await oban.get_job(held.id)).state is JobState.AVAILABLE  # type: ignore[arg-type]
    await oban.resume_queue("ctl")
    await wait_for(lambda: seen.get("quick") == [2, 1], timeout=3)
    applied = ctl_changed()
    await oban.scale_queue("ctl", limit=7, node="n1")
    await asyncio.wait_for(applied, 3)
    assert runner.queue_states()["ctl"].limit == 7
    # A control for another node: stored, read here by the next runs of the controls duty, not applied.
    await oban.scale_queue("ctl", limit=3, node="other-node")
    await duty_runs(runner, "controls")
    assert runner.queue_states()["ctl"].limit == 7


async def test_late_ack_from_a_presumed_dead_node_is_ignored(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    import uuid

    from oban_py.runtime.claims import Target, claim_jobs, write_acks
    from oban_py.runtime.outcome import Ack

    job = await oban.insert(Quick.new({"i": 1}))
    dead, alive = str(uuid.uuid4()), str(uuid.uuid4())
    driver = oban.driver
    [first] = await claim_jobs(driver, None, [Target("ctl")], 1, node="dead", instance=dead)
    # The dead node never heartbeated: any live node rescues its job, and another node claims it again.
    await driver.fetchval("node_heartbeat", instance=alive, node="alive", meta="{}")
    rescued = await parking.transition(
        driver, "job_rescue", instance=alive, rescue_after=30.0, limit=10, channel=driver.insert_channel
    )
    assert [r["id"] for r in rescued] == [job.id]
    [second] = await claim_jobs(driver, None, [Target("ctl")], 1, node="alive", instance=alive)
    assert second["attempt"] == 2 and second["attempted_at"] != first["attempted_at"]
    async with driver.connection() as conn:  # now the dead node's late outcome arrives
        await write_acks(driver, conn, [Ack(job.id, first["attempted_at"], "discarded")])  # type: ignore[arg-type]
    row = await oban.get_job(job.id)  # type: ignore[arg-type]
    assert row.state is JobState.EXECUTING and row.attempt == 2 and row.attempted_by == "alive"
    async with driver.connection() as conn:
        await write_acks(driver, conn, [Ack(job.id, second["attempted_at"], "completed")])  # type: ignore[arg-type]
    assert (await oban.get_job(job.id)).state is JobState.COMPLETED  # type: ignore[arg-type]
