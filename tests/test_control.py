"""Job control (get/cancel/retry/delete), leadership, and queue controls."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from oban_py import Job, JobState, Oban, Worker, worker
from oban_py.errors import JobNotFound

from helpers import wait_for

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
    await wait_for(lambda: runner.node.producers["ctl"].running == 0)
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
    await wait_for(lambda: a.node.is_leader or b.node.is_leader, timeout=5)
    for _ in range(10):
        assert a.node.is_leader != b.node.is_leader
        await asyncio.sleep(0.05)
    leader, follower = (a, b) if a.node.is_leader else (b, a)
    await leader.stop()
    await wait_for(lambda: follower.node.is_leader, timeout=5)


async def test_pause_resume_scale(make_oban: Any, oban: Oban, db: asyncpg.Connection, prefix: str) -> None:
    runner = await make_oban(queues={"ctl": 2}, node="n1")
    producer = runner.node.producers["ctl"]
    await oban.pause_queue("ctl")
    await wait_for(lambda: producer.paused, timeout=3)
    await oban.insert(Quick.new({"i": 1}))
    await asyncio.sleep(0.4)
    assert "quick" not in seen
    await oban.resume_queue("ctl")
    await wait_for(lambda: seen.get("quick") == [1], timeout=3)
    await oban.scale_queue("ctl", limit=7, node="n1")
    await wait_for(lambda: producer.limit == 7, timeout=3)
    await oban.scale_queue("ctl", limit=3, node="other-node")
    await asyncio.sleep(0.3)
    assert producer.limit == 7


async def test_late_ack_from_a_presumed_dead_node_is_ignored(
    oban: Oban, db: asyncpg.Connection, prefix: str
) -> None:
    import uuid

    from oban_py.runtime.executor import Ack
    from oban_py.runtime.producer import Target, claim_jobs, write_acks

    job = await oban.insert(Quick.new({"i": 1}))
    dead, alive = str(uuid.uuid4()), str(uuid.uuid4())
    driver = oban.driver
    [first] = await claim_jobs(driver, None, [Target("ctl")], 1, node="dead", instance=dead)
    # The dead node never heartbeated: any live node rescues its job, and another node claims it again.
    await driver.execute("node_heartbeat", instance=alive, node="alive", meta="{}")
    rescued = await driver.transition(
        "job_rescue", instance=alive, rescue_after=30.0, limit=10, channel=driver.insert_channel
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
