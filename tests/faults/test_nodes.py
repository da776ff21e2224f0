"""Nodes that are presumed dead but are not, and two producers on one queue.

* SIGSTOP a node for longer than ``rescue_after``: the other node rescues its jobs and runs them; on
  SIGCONT the stopped node must not go on with (nor finish) bodies it no longer owns: it cancels them
  at once.
* One node serving queue ``a`` twice, as ``a = 3`` and through a selection ``["a"]``, while its
  backends are terminated again and again: no job runs twice at once.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from . import fault_workers as fw
from .checks import wait_final
from .common import kill_backends, verdict
from .scenario import Scenario
from .settings import SEED, scaled, timeout
from helpers import wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: How long a resumed node may go on with a rescued body before it notices (one loop turn or two).
RESUME_GRACE = 0.5


@timeout(60)
async def test_stopped_node_does_not_finish_rescued_jobs(scenario: Scenario) -> None:
    s = scenario
    a = await s.cluster.start("stop-a", {"work": 2})
    jobs = await s.client.insert_all([fw.Sleep.new({"ms": 8000, "ticks": True}) for _ in range(2)])
    ids = {j.id for j in jobs}
    await wait_for(lambda: len([r for r in s.cluster.runs() if r.job_id in ids]) == 2, 10, what="both on a")
    b = await s.cluster.start("stop-b", {"work": 2})
    a.freeze()
    await wait_for(
        lambda: {r.job_id for r in s.cluster.runs() if r.pid == b.pid} >= ids, 15, what="stop-b re-runs both"
    )
    thawed = a.thaw()
    await wait_final(s.db, 2, 20, s.context)
    await wait_for(lambda: all(r.end_kind != "open" for r in s.cluster.runs()), 10, what="bodies over")
    problems = []
    for run in (r for r in s.cluster.runs() if r.pid == a.pid):
        last = max([run.start, *run.ticks, int(run.end)])
        went_on = (last - thawed) / 1e9
        if run.outcome == "ok":
            problems.append(f"stop-a finished the body of job {run.job_id}, which stop-b had taken over")
        if went_on > RESUME_GRACE:
            problems.append(f"stop-a went on with job {run.job_id} for {went_on:.2f}s after SIGCONT")
    for job in await s.db.jobs(ids):
        if job["attempted_by"] != "stop-b":
            problems.append(f"job {job['id']} final state written by {job['attempted_by']}")
    assert not problems, "\n".join(problems) + "\n" + s.context()


@timeout(60)
async def test_queue_served_twice_on_one_node_with_backend_terminations(scenario: Scenario) -> None:
    s, rng = scenario, random.Random(SEED)
    await s.cluster.start("twice", {"a": 3, "sel": {"queues": ["a"], "limit": 3}})
    jobs = await s.client.insert_all(
        [fw.Sleep.new({"ms": rng.randint(50, 300)}, queue="a") for _ in range(scaled(200))]
    )
    killed = 0
    for _ in range(scaled(10)):
        await asyncio.sleep(rng.uniform(0.3, 0.6))  # the fault cadence
        killed += await kill_backends(s, ["twice"])
    await verdict(s, len(jobs), timeout=40, limits={"a": 6})
    assert killed > 0
