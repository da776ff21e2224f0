"""Poison outcomes: a job whose outcome PostgreSQL or JSON rejects (a NUL byte or a lone surrogate in
an error message, a Cancel reason or a Record value; NaN in a result or in Snooze meta; an infinite or
absurd Snooze; an exception whose ``str()`` raises) must not wedge its queue, on the node that ran it
nor on the next node after a rescue. Each poison job ends recorded (final, retryable or scheduled,
with its error stored) and the 50 ordinary jobs behind it in the same queue complete.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from . import fault_workers as fw
from .checks import FINAL, Db
from .scenario import Scenario
from .settings import SCALE, timeout

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RECORDED = (*FINAL, "retryable", "scheduled")


def recorded(job: Any) -> bool:
    """The engine wrote this attempt's outcome (whatever it was)."""
    if job["state"] in RECORDED:
        return True
    meta = json.loads(job["meta"])
    return job["errors"] != "[]" or "snoozed" in meta


async def poison_and_normal(s: Scenario, normal: int) -> tuple[dict[int, str], list[int]]:
    """The poison jobs (id: kind) first, then ``normal`` plain jobs behind them in the same queue."""
    poison = await s.client.insert_all([fw.Poison.new({"kind": k}) for k in fw.POISON_KINDS])
    plain = await s.client.insert_all([fw.Sleep.new({"ms": 20}, queue="poison") for _ in range(normal)])
    return {j.id: j.args["kind"] for j in poison if j.id}, [j.id for j in plain if j.id]


async def phase(db: Db, poison: dict[int, str], plain: list[int], seconds: float) -> str:
    """Wait up to ``seconds`` for every poison job recorded and every plain one completed; '' if so."""
    deadline = time.monotonic() + seconds
    while True:
        jobs = {j["id"]: j for j in await db.jobs([*poison, *plain])}
        stuck = [jobs[i] for i in poison if not recorded(jobs[i])]
        waiting = [jobs[i] for i in plain if jobs[i]["state"] != "completed"]
        if not stuck and not waiting:
            bad = [
                f"job {j['id']} {j['state']} without an error entry"
                for j in (jobs[i] for i in poison)
                if j["state"] in ("discarded", "retryable") and j["errors"] == "[]"
            ]
            return "; ".join(bad)
        if time.monotonic() > deadline:
            return (
                f"after {seconds}s: {len(waiting)}/{len(plain)} plain jobs not completed "
                f"({sorted({j['state'] for j in waiting})}); poison jobs not recorded: "
                + ", ".join(f"{poison[j['id']]} (job {j['id']}, {j['state']})" for j in stuck)
            )
        await asyncio.sleep(0.1)


@timeout(60)
async def test_poison_outcomes_do_not_wedge_the_queue(scenario: Scenario) -> None:
    s = scenario
    first = await s.cluster.start("poison-a", {"poison": 5})
    poison, plain = await poison_and_normal(s, 50)
    problems = []
    if outcome := await phase(s.db, poison, plain, 10 * SCALE):
        problems.append(f"node poison-a: {outcome}")
    alive = first.alive
    # The next node after a rescue: the first node dies with whatever it holds, a fresh one takes over
    # (and gets a second batch of poison and plain jobs).
    first.kill()
    await s.cluster.start("poison-b", {"poison": 5})
    more_poison, more_plain = await poison_and_normal(s, 50)
    if outcome := await phase(s.db, {**poison, **more_poison}, plain + more_plain, 12 * SCALE):
        problems.append(f"node poison-b (after the rescue): {outcome}")
    if not alive:
        problems.append("node poison-a died")
    kinds = {**poison, **more_poison}
    for job in await s.db.jobs(kinds):
        error = str((json.loads(job["errors"])[-1:] or [{}])[0].get("error"))[:80]
        print(f"poison {kinds[job['id']]}: {job['state']} result={job['result']} error={error!r}")
    assert not problems, "\n".join(problems) + "\n" + s.context()
