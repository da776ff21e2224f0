"""Claiming jobs and writing their outcomes: the SQL side of a producer, shared with ``drain_queue``.

:func:`claim_jobs` completes the previous batch and claims the next in one round trip
(``oban_fetch_v1``, which enforces keyed, global and rate limits under advisory locks).
:func:`write_acks` writes the other outcomes; a row an ack moves back into its unique group comes back
*parked* and is settled by :mod:`oban_py.db.parking`. :class:`ClaimGate` keeps a node's reconcile from
running while any of its fetches is in flight. :func:`fallback` is the plain outcome written in place of
one the database refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..db import parking
from ..limits import RateLimit
from .outcome import Ack, scrub

if TYPE_CHECKING:
    from ..db.driver import Driver

__all__ = ["ClaimGate", "Target", "claim_jobs", "fallback", "write_acks"]


class ClaimGate:
    """Producer cycles of one node run side by side; a reconcile runs alone.

    A reconcile puts back jobs claimed by this node that no producer holds (a fetch whose reply was
    lost). It must not run while any cycle is in flight, or it would put back rows a fetch has just
    claimed but not yet handed to its producer: the gate waits for cycles to finish and holds new
    ones back meanwhile.
    """

    def __init__(self) -> None:
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()

    async def enter(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        while not self._open.is_set():
            await self._open.wait()
        self._open.clear()
        try:
            while self.active:
                await self._idle.wait()
            yield
        finally:
            self._open.set()


@dataclass
class Target:
    """A queue a producer takes jobs from, with the queue's cluster-wide limits."""

    queue: str
    global_limit: int | None = None
    rate: RateLimit | None = None


def fallback(ack: Ack, error: Exception) -> Ack:
    """A plain outcome in place of one the database refused: no result or meta, an ASCII error entry.
    A retry or snooze becomes a discard: the same body would return the same outcome again."""
    entry = json.dumps(
        {
            "at": datetime.now(timezone.utc).isoformat(),
            "kind": "bad_outcome",
            "error": f"the outcome ({ack.state}) could not be stored: {type(error).__name__}: "
            + scrub(str(error), 500).encode("ascii", "backslashreplace").decode("ascii"),
        }
    )
    if ack.state == "available":
        return Ack(ack.id, ack.claim, "available", delay=0.0, attempt_delta=ack.attempt_delta)
    state = ack.state if ack.state in ("completed", "cancelled", "discarded") else "discarded"
    return Ack(ack.id, ack.claim, state, error=entry)


async def claim_jobs(
    driver: Driver,
    conn: Any,
    targets: Sequence[Target],
    demand: int,
    *,
    node: str,
    instance: str,
    acks: Sequence[Ack] = (),
) -> list[Any]:
    """Complete ``acks`` and claim up to ``demand`` jobs from ``targets`` (in order), limits enforced.

    Rows come back with ``kind``: ``job`` (claimed, to run), ``skipped`` (its key was full and it
    skips) or ``parked`` (an acked row that re-entered its unique group).
    """
    return await driver.fetch(
        "job_fetch",
        conn,
        queues=[t.queue for t in targets],
        global_limits=[t.global_limit for t in targets],
        rate_allowed=[t.rate.allowed if t.rate else None for t in targets],
        rate_periods=[t.rate.period if t.rate else None for t in targets],
        rate_by=[t.rate.by if t.rate else None for t in targets],
        demand=demand,
        node=node,
        instance=instance,
        # Look at twice the demand: room to pass over jobs whose limit key is busy.
        scan=max(demand * 2, 10),
        ack_ids=[a.id for a in acks],
        ack_claims=[a.claim for a in acks],
    )


async def write_acks(driver: Driver, conn: Any, acks: list[Ack]) -> list[int]:
    """Write acks; returns the ids of rows left parked (settled later by :func:`parking.unpark`).

    Completions (with or without a recorded result) are written by one plain statement. Any other
    outcome may move a job back into its unique group (a snooze into the ``scheduled`` group, a retry,
    a return to the queue), so those are written by :func:`parking.transition`, which settles the key before
    commit: no other insert can slip in between.
    """
    done = [a for a in acks if a.state == "completed"]
    other = [a for a in acks if a.state != "completed"]
    parked: list[int] = []
    if done and all(a.simple for a in done):
        rows = await driver.fetch(
            "job_ack_completed", conn, ids=[a.id for a in done], claims=[a.claim for a in done]
        )
        parked.extend(r["id"] for r in rows if r["parked"])
    elif done:
        rows = await driver.fetch("job_ack", conn, **_ack_params(done))
        parked.extend(r["id"] for r in rows if r["parked"])
    if other:
        await parking.transition(driver, "job_ack", conn, **_ack_params(other))
    return parked


def _ack_params(acks: list[Ack]) -> dict[str, Any]:
    return {
        "ids": [a.id for a in acks],
        "claims": [a.claim for a in acks],
        "states": [a.state for a in acks],
        "delays": [a.delay for a in acks],
        "errors": [a.error for a in acks],
        "results": [a.result for a in acks],
        "metas": [a.meta for a in acks],
        "attempt_deltas": [a.attempt_delta for a in acks],
    }
