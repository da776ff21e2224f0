"""Queues started and stopped at run time: one node or the cluster, stored across restarts, drained."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oban_py import Job, JobState, Oban, Worker, worker
from oban_py.errors import LimitOptionsError, ValidationError

from helpers import wait_for

pytestmark = pytest.mark.anyio

ran: list[tuple[str, int]] = []
release = asyncio.Event()


@worker(queue="dyn")
class Dyn(Worker):
    async def process(self, job: Job[Any]) -> None:
        ran.append((str(job.attempted_by or ""), job.args["i"]))


@worker(queue="slow_dyn")
class SlowDyn(Worker):
    async def process(self, job: Job[Any]) -> None:
        ran.append(("slow", job.args["i"]))
        await release.wait()


@pytest.fixture(autouse=True)
def _reset() -> None:
    ran.clear()
    release.clear()


def _runs(node: Oban, queue: str, limit: int | None = None) -> bool:
    state = node.queue_states().get(queue)
    return state is not None and (limit is None or state.limit == limit)


async def _state(oban: Oban, job: Job[Any]) -> JobState:
    return (await oban.get_job(job.id)).state  # type: ignore[arg-type]


def _is(oban: Oban, job: Job[Any], state: JobState) -> Any:
    async def check() -> bool:
        return await _state(oban, job) is state

    return check


async def test_start_and_stop_on_one_node(make_oban: Any, oban: Oban) -> None:
    a = await make_oban(queues={"base": 1}, node="a")
    b = await make_oban(queues={"base": 1}, node="b")
    await oban.start_queue("dyn", limit=3, node="a")
    await wait_for(lambda: _runs(a, "dyn", 3), what="dyn started on a")
    await oban.insert(Dyn.new({"i": 1}))
    await wait_for(lambda: ran == [("a", 1)], what="job ran on a")
    assert not _runs(b, "dyn")  # the other node was not asked

    await oban.stop_queue("dyn", node="a")
    await wait_for(lambda: not _runs(a, "dyn"), what="dyn stopped on a")
    assert _runs(a, "base") and _runs(b, "base")


async def test_cluster_wide_start_reaches_every_node_and_survives_a_restart(
    make_oban: Any, oban: Oban
) -> None:
    a = await make_oban(queues={"base": 1}, node="a")
    b = await make_oban(queues={"base": 1}, node="b")
    await oban.start_queue("dyn", limit=2)
    await wait_for(lambda: _runs(a, "dyn", 2) and _runs(b, "dyn", 2), what="dyn on both nodes")
    await oban.scale_queue("dyn", limit=4)  # the other controls apply to it like to a configured queue
    await wait_for(lambda: _runs(a, "dyn", 4) and _runs(b, "dyn", 4), what="dyn scaled")

    await b.stop()
    c = await make_oban(queues={"base": 1}, node="c")  # a node started later runs it from the start
    assert _runs(c, "dyn", 4)
    jobs = await oban.insert_all([Dyn.new({"i": i}) for i in range(6)])
    await wait_for(lambda: len(ran) == 6, what="six jobs ran")
    assert {await _state(oban, j) for j in jobs} == {JobState.COMPLETED}

    await oban.stop_queue("dyn")
    await wait_for(lambda: not _runs(a, "dyn") and not _runs(c, "dyn"), what="dyn stopped everywhere")
    d = await make_oban(queues={"base": 1}, node="d")
    assert not _runs(d, "dyn")


async def test_stop_queue_stops_a_configured_queue_across_restarts(make_oban: Any, oban: Oban) -> None:
    a = await make_oban(queues={"base": 1, "dyn": 2}, node="a")
    await oban.stop_queue("dyn")
    await wait_for(lambda: not _runs(a, "dyn"), what="configured dyn stopped")
    await a.stop()
    again = await make_oban(queues={"base": 1, "dyn": 2}, node="a")
    assert not _runs(again, "dyn") and _runs(again, "base")
    await oban.start_queue("dyn", limit=5)
    await wait_for(lambda: _runs(again, "dyn", 5), what="dyn started again with the new limit")


async def test_stop_drains_running_jobs(make_oban: Any, oban: Oban) -> None:
    a = await make_oban(queues={"base": 1}, node="a", shutdown_timeout=10.0)
    await oban.start_queue("slow_dyn", limit=1)
    await wait_for(lambda: _runs(a, "slow_dyn"), what="slow_dyn started")
    running = await oban.insert(SlowDyn.new({"i": 1}))
    waiting = await oban.insert(SlowDyn.new({"i": 2}))
    await wait_for(lambda: ran == [("slow", 1)], what="first job running")

    await oban.stop_queue("slow_dyn")
    await wait_for(lambda: not _runs(a, "slow_dyn"), what="slow_dyn no longer fetching")
    assert await _state(oban, running) is JobState.EXECUTING  # still running: a stop is not a kill
    release.set()
    await wait_for(_is(oban, running, JobState.COMPLETED), what="running job completed")
    assert await _state(oban, waiting) is JobState.AVAILABLE  # left for whoever runs the queue
    assert ran == [("slow", 1)]


async def test_bad_names_and_limits_are_typed_errors(oban: Oban) -> None:
    with pytest.raises(ValidationError, match="queue"):
        await oban.start_queue("no spaces")
    with pytest.raises(ValidationError, match="queue"):
        await oban.start_queue("mail*")  # a selection belongs in the config
    with pytest.raises(LimitOptionsError, match="limit"):
        await oban.start_queue("dyn", limit=0)
    with pytest.raises(ValidationError, match="node"):
        await oban.stop_queue("dyn", node="")
