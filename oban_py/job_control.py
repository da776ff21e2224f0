"""Changing jobs from outside: cancel, delete, retry and update, as statements the facade calls.

Each is one statement or one transaction, safe to run again when it deadlocks (it was rolled back
whole). A retry is an insert of the job again: it takes its unique key, so it can conflict; then
:func:`retry` retries none of the jobs and raises :class:`UniqueConflict` naming the holder.
Interrupting the jobs that were running is the caller's part (:func:`interrupt_message`). An update
that moves a unique job back into its unique group takes its key in the same transaction, or changes
nothing and raises :class:`UniqueConflict` (:func:`update`).

Each takes ``where``, the filter its ids were selected by (:meth:`JobFilter.params
<oban_py.job_query.JobFilter.params>`; None when called by id). The statement re-checks it on the
rows it locks, so a row that stopped matching between the select and the change is left alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from .db.retry import retry_deadlocks
from .errors import UniqueConflict, ValidationError
from .job_query import NO_FILTER
from .validation import validate_meta, validate_priority, validate_queue, validate_scheduled_at, validate_tags

if TYPE_CHECKING:
    from .db.driver import Driver

__all__ = ["UPDATABLE", "cancel", "delete", "interrupt_message", "retry", "update", "update_params"]

#: The states in which a job can be updated: it has not started.
UPDATABLE = ("available", "scheduled")


Filter = Mapping[str, Any] | None


def _match(where: Filter) -> dict[str, Any]:
    """The ``job_filter`` parameters of a statement: ``where``, or none (every row of the ids)."""
    return dict(NO_FILTER if where is None else where)


async def cancel(driver: Driver, ids: list[int], reason: str | None, where: Filter = None) -> list[Any]:
    """Cancel the jobs that have not finished; rows say what each ``was`` (and whether it is parked)."""
    # One statement, a whole transaction of its own: safe to run again if it deadlocks.
    match = _match(where)
    return await retry_deadlocks(lambda: driver.fetch("job_cancel", ids=ids, reason=reason, **match))


async def delete(driver: Driver, ids: list[int], where: Filter = None) -> list[Any]:
    """Delete the jobs of ``ids`` (that still match ``where``); rows say what each ``was``."""
    return await driver.fetch("job_delete", ids=ids, **_match(where))


def interrupt_message(rows: list[Any], reason: str) -> dict[str, Any] | None:
    """The ``interrupt`` signal for the jobs among ``rows`` that were executing (None if none was)."""
    running = [r["id"] for r in rows if r["was"] == "executing"]
    return {"kind": "interrupt", "ids": running, "reason": reason} if running else None


async def retry(driver: Driver, ids: list[int], where: Filter = None) -> int:
    """Retry ``ids`` (those that still match ``where``) all or nothing; returns how many were retried."""
    match = _match(where)

    async def run() -> list[Any]:
        async with driver.transaction() as conn:
            rows = await driver.fetch("job_retry", conn, ids=ids, **match)
            blocked = [r for r in rows if r["holder"] is not None]
            if blocked:  # a duplicate of a live holder, without taking the key: retry none
                raise Rollback(blocked[0])
            for queue in {r["queue"] for r in rows}:
                await driver.notify(driver.insert_channel, queue, conn)
        return rows

    try:
        rows = await retry_deadlocks(run)
    except asyncpg.UniqueViolationError:
        raise await conflict(driver, ids, match) from None
    except Rollback as found:
        raise await conflict(driver, ids, match, blocked=found.args[0]) from None
    return len(rows)


async def conflict(
    driver: Driver, ids: list[int], match: dict[str, Any], *, blocked: Any = None
) -> UniqueConflict:
    """Which job of a failed retry collides, and with whom (a rare path: one try per prefix).

    ``blocked``: a job_retry row whose job does not take its key and met a live holder.
    """
    if blocked is not None:
        found = await driver.fetch("job_get", ids=[blocked["holder"]])
        return UniqueConflict(blocked["id"], blocked["holder"], found[0]["state"] if found else None)
    for k in range(1, len(ids) + 1):
        try:
            async with driver.transaction() as conn:
                rows = await driver.fetch("job_retry", conn, ids=ids[:k], **match)
                raise Rollback(next((r for r in rows if r["holder"] is not None), None))
        except Rollback as tried:
            if tried.args[0] is not None:
                return await conflict(driver, ids, match, blocked=tried.args[0])
            continue
        except asyncpg.UniqueViolationError:
            # ids[k-1] collides, with an existing holder or with one of ids[:k-1] retried before it.
            try:
                async with driver.transaction() as conn:
                    if k > 1:
                        await driver.fetch("job_retry", conn, ids=ids[: k - 1], **match)
                    holder = await driver.fetchrow("job_unique_holder", conn, id=ids[k - 1])
                    raise Rollback(holder)
            except Rollback as found:
                row = found.args[0] if found.args else None
                if row is not None:
                    return UniqueConflict(ids[k - 1], row["id"], row["state"])
    return UniqueConflict(ids[0], -1)  # pragma: no cover - the holder vanished meanwhile


class Rollback(Exception):
    """Raised inside a transaction only to roll it back."""


def update_params(
    *,
    priority: int | None = None,
    scheduled_at: datetime | None = None,
    queue: str | None = None,
    tags: list[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``job_update`` parameters for these changes, each checked by the rule an insert uses."""
    if all(v is None for v in (priority, scheduled_at, queue, tags, meta)):
        raise ValidationError("changes", {}, "give at least one of priority, scheduled_at, queue, tags, meta")
    return {
        "priority": None if priority is None else validate_priority(priority),
        "scheduled_at": None if scheduled_at is None else validate_scheduled_at(scheduled_at),
        "queue": None if queue is None else validate_queue(queue),
        "tags": None if tags is None else validate_tags(tags),
        "meta": None if meta is None else json.dumps(dict(validate_meta(meta))),
    }


async def update(driver: Driver, ids: list[int], changes: dict[str, Any], where: Filter = None) -> list[Any]:
    """Update the jobs of ``ids`` that are available or scheduled (and still match ``where``), all or
    nothing; their new rows.

    Rows that re-entered their unique group take their key back here; if another job holds it,
    nothing changes and :class:`UniqueConflict` names the holder. Queues that got an available job
    (moved to them, or due now) are notified, so their producers fetch it without waiting for a poll.
    """
    match = _match(where)

    async def run() -> list[Any]:
        async with driver.transaction() as conn:
            rows = await driver.fetch("job_update", conn, ids=ids, **changes, **match)
            for row in rows:
                if row["parked"]:
                    await take_key(driver, conn, row["id"])
            woken = {
                r["queue"]
                for r in rows
                if r["state"] == "available" and (r["was"] != "available" or r["queue"] != r["was_queue"])
            }
            for queue in sorted(woken):
                await driver.notify(driver.insert_channel, queue, conn)
        return rows

    return await retry_deadlocks(run)


async def take_key(driver: Driver, conn: Any, job_id: int) -> None:
    """Give a parked row its unique key back (in a savepoint), or raise naming the holder."""
    try:
        async with conn.transaction():
            await driver.fetchrow("job_unpark", conn, id=job_id)
    except asyncpg.UniqueViolationError:
        holder = await driver.fetchrow("job_unique_holder", conn, id=job_id)
        raise UniqueConflict(
            job_id, holder["id"] if holder else -1, holder["state"] if holder else None, action="updated"
        ) from None
