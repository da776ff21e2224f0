"""Running a queue's jobs inline, in the caller's task: ``Oban.drain_queue`` (the seed of testing).

A drain needs no producer: it claims one job at a time with the producer's own statement
(:func:`~.claims.claim_jobs`, limits enforced), runs it with the producer's executor, and writes the
outcome with :func:`~.claims.write_acks`. It registers as a short-lived node of its own, heartbeating
like one (:func:`~.maintenance.lifeline.heartbeat`): a cluster's rescuer treats jobs claimed by an
unregistered instance as orphans and would run them twice, and a running node's reconciler puts
back claims of its own instance that none of its producers holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..db import parking
from ..db.rows import job_from_record
from .claims import Target, claim_jobs, write_acks
from .execution import Execution
from .executor import execute
from .maintenance.lifeline import heartbeat

if TYPE_CHECKING:
    from ..db.driver import Driver

__all__ = ["drain"]


@contextlib.asynccontextmanager
async def _registered(driver: Driver, name: str, meta: str, interval: float) -> AsyncIterator[str]:
    """A node row for the drain's instance, kept fresh every ``interval`` s and removed at the end."""
    instance = str(uuid.uuid4())

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            await heartbeat(driver, instance=instance, node=name, meta=meta)

    await heartbeat(driver, instance=instance, node=name, meta=meta)
    task = asyncio.create_task(beat())
    try:
        yield instance
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.shield(driver.execute("node_delete", instance=instance))


async def drain(
    driver: Driver,
    queue: str,
    *,
    node: str,
    heartbeat_interval: float,
    with_scheduled: bool = False,
    limit: int = 10_000,
) -> dict[str, int]:
    """Run ``queue``'s available jobs one at a time until none are left (or ``limit`` ran); counts by
    final state. ``with_scheduled`` first makes the queue's scheduled and retryable jobs due now
    (repeatedly, so retries run too)."""
    meta = json.dumps({"drain": queue})
    counts: dict[str, int] = {}
    async with _registered(driver, f"drain:{node}", meta, min(1.0, heartbeat_interval)) as instance:
        done = 0
        while done < limit:
            if with_scheduled:
                await driver.execute("job_make_due", queue=queue)
                await parking.transition(driver, "job_stage", channel=driver.insert_channel, limit=limit)
            rows = await claim_jobs(driver, None, [Target(queue)], 1, node="drain", instance=instance)
            if not rows:
                break
            for row in rows:
                if row["kind"] == "skipped":
                    counts["cancelled"] = counts.get("cancelled", 0) + 1
                    continue
                ack = await execute(Execution(job_from_record(row), row["attempted_at"]))
                if ack is None:
                    continue
                async with driver.connection() as conn:
                    parked = await write_acks(driver, conn, [ack])
                if parked:
                    await parking.unpark(driver, parked)
                counts[ack.state] = counts.get(ack.state, 0) + 1
                done += 1
    return counts
