"""Parking: how a job that re-enters its unique group gets its key back, or loses it.

A unique job holds its key only while it is in one of its ``unique_states`` (the partial unique index
covers those rows alone). A job that leaves that group (it starts, it is cancelled) and comes back to it
(a retry, a snooze into ``scheduled``, a rescue, a job handed back to the queue) may meet another job
that took the key meanwhile. The statement that moves it back cannot know, so it marks the row
*parked* (the ``PARKED`` bit of the row's flags, ``__parked__`` in SQL) instead of taking the key, and the
producers do not fetch parked rows. Everything here settles parked rows:

* :func:`transition`: a state change whose rows may become fetchable (staging, rescue, acks that return
  a job to the queue) settles its parked rows in the same transaction, so no producer can fetch them
  first.
* :func:`unpark`: rows parked by a statement that could not settle them (a completion that rode along
  with a fetch, a cancel of a running job) get one short transaction each.
* :func:`sweep`: the leader's unique sweep clears keys of jobs that left their group for good and
  retries rows still parked (an uncommitted holder blocked them past the lock timeout).

Each parked row ends ``"held"`` (it took the key back), ``"cancelled"`` (another job holds the key and
this one had not started) or ``"released"`` (it runs on without the key).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import asyncpg

from .retry import retry_deadlocks

if TYPE_CHECKING:
    from .driver import Driver
    from .query_names import ManyQuery

__all__ = ["SWEEP_BATCH", "sweep", "transition", "unpark", "unpark_one"]

log = logging.getLogger("oban_py.db")

# Rows whose keys are cleared per sweep statement, and parked rows retried per sweep.
SWEEP_BATCH = 10_000
PARKED_RETRY_BATCH = 1_000


async def transition(
    driver: Driver, query: ManyQuery, conn: Any = None, /, **params: Any
) -> list[asyncpg.Record]:
    """Run a state-changing query whose rows may become fetchable, settling parked rows first.

    Rows returned with ``parked`` (they re-entered their unique group) take their key back, or lose
    it to the holder, inside the same transaction: no producer can fetch them before that is
    settled. When the transaction is ours (no connection given, or one outside a transaction), a
    deadlock runs it again, a bounded number of times: it was rolled back entirely.
    """

    async def run() -> list[asyncpg.Record]:
        async with driver.transaction(conn) as c:
            rows = await driver.fetch(query, c, **params)
            parked = [r["id"] for r in rows if r["parked"]]
            if parked:
                for job_id in parked:
                    await unpark_one(driver, c, job_id, 200)
                await c.execute("SET LOCAL lock_timeout TO DEFAULT")
            return rows

    if conn is None or not conn.is_in_transaction():
        return await retry_deadlocks(run)
    return await run()


async def unpark(driver: Driver, ids: Iterable[int], *, lock_timeout_ms: int = 200) -> dict[int, str]:
    """Give parked rows their unique key back, one short transaction each.

    Returns ``{id: outcome}`` (``"held"``, ``"cancelled"``, ``"released"``, or ``"waiting"``: an
    uncommitted holder blocked us past the lock timeout, and the sweep retries). A job that is no
    longer parked is left out.
    """
    outcomes: dict[int, str] = {}
    async with driver.connection() as conn:
        for job_id in ids:
            outcome = await unpark_one(driver, conn, job_id, lock_timeout_ms)
            if outcome is not None:
                outcomes[job_id] = outcome
    return outcomes


async def unpark_one(driver: Driver, conn: Any, job_id: int, lock_timeout_ms: int) -> str | None:
    """Unpark one row in its own transaction, or in a savepoint of the caller's."""
    for _ in range(3):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'")
                row = await driver.fetchrow("job_unpark", conn, id=job_id)
            return "held" if row is not None else None
        except asyncpg.UniqueViolationError:
            holder = await driver.fetchrow("job_unique_holder", conn, id=job_id)
            if holder is None:
                continue  # the holder left between our attempt and the lookup: try again
            lost = await driver.fetchrow("job_unpark_lost", conn, id=job_id, holder=holder["id"])
            if lost is None:
                return None
            outcome = "cancelled" if lost["state"] == "cancelled" else "released"
            log.info(
                "unique key of job %s is held by job %s; job %s %s",
                job_id,
                holder["id"],
                job_id,
                outcome,
                extra={"job_id": job_id, "holder_id": holder["id"], "outcome": outcome},
            )
            return outcome
        except asyncpg.LockNotAvailableError:
            return "waiting"
    return "waiting"


async def sweep(driver: Driver) -> None:
    """Clear the keys of jobs that left their unique group for good, then retry rows still parked."""
    await driver.execute("job_unique_sweep", limit=SWEEP_BATCH)
    parked = await driver.fetch("job_parked", limit=PARKED_RETRY_BATCH)
    if parked:
        await unpark(driver, [r["id"] for r in parked])
