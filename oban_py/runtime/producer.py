"""The per-queue producer: fetch, run, ack.

One producer per queue per node. Each wake-up (a NOTIFY for its queue, a finished job, the poll
timer) completes the jobs that finished and claims up to ``limit - running`` more, in one round trip
(``oban_fetch``). Jobs run as asyncio tasks; their outcomes are queued as acks and written together on
the next cycle, so a busy queue costs one round trip per batch of jobs, not per job. Outcomes other
than completion (retries, snoozes, cancels) are written first, in a transaction that settles unique
keys.

Failure handling:

* A lost connection during an ack keeps the acks and retries them (the claim guard makes a repeated
  ack harmless).
* A lost connection during a fetch leaves its outcome unknown: the fetch may have claimed rows we
  never saw. The next cycle first puts back every job claimed by this producer that it does not hold.
* Shutdown stops fetching, lets running jobs finish for up to ``shutdown_timeout``, then cancels them
  and puts them back in the queue without counting the attempt.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio

from ..db.rows import job_from_record
from ..errors import DatabaseUnavailable, UnknownWorker
from ..job import Job
from ..limits import RateLimit
from ..worker import get_worker
from .executor import Ack, _failure, execute

if TYPE_CHECKING:
    from ..db.driver import Driver

__all__ = ["Producer", "ProducerContext", "Target", "claim_jobs", "write_acks"]

log = logging.getLogger("oban_py.producer")


@dataclass
class ProducerContext:
    """What a producer needs from its node."""

    driver: Driver
    node: str
    instance: str
    poll_interval: float
    spawn: Callable[[Coroutine[Any, Any, Any]], Any]


class Backoff:
    """Exponential backoff with jitter for retrying after database errors."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return float(min(self.cap, self.base * 2 ** (self.failures - 1)) * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class Target:
    """A queue a producer takes jobs from, with the queue's cluster-wide limits."""

    queue: str
    global_limit: int | None = None
    rate: RateLimit | None = None


class Producer:
    """Fetches and runs the jobs of one queue (or an ordered selection of queues) on this node.

    Claims go through ``oban_fetch`` (migration 002), which also completes the previous batch and
    enforces keyed, global and rate limits under advisory locks.
    """

    def __init__(
        self,
        ctx: ProducerContext,
        name: str,
        limit: int,
        *,
        paused: bool = False,
        targets: list[Target] | None = None,
        patterns: list[str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.name = name
        self.limit = limit
        self.paused = paused
        self.patterns = patterns
        self.targets: list[Target] = targets if targets is not None else [Target(name)]
        self._running: dict[int, asyncio.Task[None]] = {}
        self._interrupts: dict[int, str] = {}
        self._acks: list[Ack] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._reconcile = False
        self._limiter = anyio.CapacityLimiter(max(1, limit))
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff()
        self.completed = 0

    @property
    def queue(self) -> str:
        return self.name

    @property
    def queues(self) -> list[str]:
        return [t.queue for t in self.targets]

    # -- control ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"oban-producer-{self.name}"
            )

    def notify(self) -> None:
        self._wake.set()

    @property
    def running(self) -> int:
        return len(self._running)

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._limiter.total_tokens = max(1, limit)
        self.notify()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.notify()

    def interrupt(self, job_id: int, reason: str) -> bool:
        """Cancel a running job's task (after cancel_job or delete_job). True if it ran here."""
        task = self._running.get(job_id)
        if task is None:
            return False
        self._interrupts[job_id] = reason
        task.cancel()
        return True

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109 - a grace period, not a deadline
        """Stop fetching, wait up to ``timeout`` for running jobs, then put the rest back."""
        self._stopping = True
        self.notify()
        tasks = list(self._running.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
            if pending:
                log.warning(
                    "queue %s: %d job(s) still running after %.1fs; putting them back in the queue",
                    self.queue,
                    len(pending),
                    timeout,
                    extra={"queue": self.queue},
                )
                for job_id, task in list(self._running.items()):
                    if task in pending:
                        self._interrupts[job_id] = "shutdown"
                        task.cancel()
                await asyncio.wait(pending, timeout=5.0)
        self.notify()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=10.0)
            except asyncio.TimeoutError:
                log.error(
                    "queue %s: could not write %d final ack(s); the jobs stay executing until rescued",
                    self.queue,
                    len(self._acks),
                    extra={"queue": self.queue},
                )
                self._task.cancel()

    # -- loop -------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if self._stopping and not self._running and not self._acks:
                return
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), self.ctx.poll_interval)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            try:
                await self._cycle()
                self._backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._backoff.next()
                if isinstance(exc, DatabaseUnavailable):
                    level = logging.WARNING if self._backoff.failures in (1, 10, 100) else logging.DEBUG
                    log.log(
                        level,
                        "queue %s: %s; retrying in %.2fs",
                        self.queue,
                        exc,
                        delay,
                        extra={"queue": self.queue},
                    )
                else:
                    log.exception("queue %s: producer cycle failed; retrying in %.2fs", self.queue, delay)
                if self._stopping and self._backoff.failures > 20:
                    return
                await asyncio.sleep(delay)
                self._wake.set()

    async def _cycle(self) -> None:
        acks, self._acks = self._acks, []
        try:
            await self._cycle_with(acks)
        except BaseException:
            # Keep them for the next cycle. Writing an ack twice is harmless: the claim guard
            # turns the second write into a no-op.
            self._acks[:0] = acks
            raise

    async def _cycle_with(self, acks: list[Ack]) -> None:
        demand = 0 if (self.paused or self._stopping) else self.limit - len(self._running)
        if not acks and demand <= 0 and not self._reconcile:
            return
        driver = self.ctx.driver
        parked: list[int] = []
        async with driver.connection() as conn:
            # Plain completions ride along with the fetch; everything else is written first.
            riding = [a for a in acks if a.simple] if demand > 0 else []
            rest = [a for a in acks if not (demand > 0 and a.simple)]
            if rest:
                parked = await self._write_acks(conn, rest)
            if self._reconcile:
                # Jobs we hold: running ones, and finished ones whose acks are not written yet.
                known = list(self._running) + [a.id for a in riding] + [a.id for a in self._acks]
                rows = await driver.transition(
                    "job_release_unknown", conn, queues=self.queues, instance=self.ctx.instance, known=known
                )
                self._reconcile = False
                if rows:
                    log.info("queue %s: put back %d job(s) from an interrupted fetch", self.queue, len(rows))
                    self._wake.set()
            if demand > 0:
                try:
                    rows = await claim_jobs(
                        driver,
                        conn,
                        self.targets,
                        demand,
                        node=self.ctx.node,
                        instance=self.ctx.instance,
                        acks=riding,
                    )
                except DatabaseUnavailable:
                    self._reconcile = True
                    raise
                self.completed += len(riding)
                for row in rows:
                    kind = row["kind"]
                    if kind == "parked":
                        parked.append(row["id"])
                    elif kind == "skipped":
                        self.ctx.spawn(_on_skip(job_from_record(row)))
                    else:
                        self._launch(row)
                        if row["parked"]:
                            parked.append(row["id"])
        if parked:
            self.ctx.spawn(driver.unpark(parked))

    async def _write_acks(self, conn: Any, acks: list[Ack]) -> list[int]:
        parked = await write_acks(self.ctx.driver, conn, acks)
        self.completed += len(acks)
        return parked

    def _launch(self, row: Any) -> None:
        job = job_from_record(row)
        claim: datetime = row["attempted_at"]
        task = asyncio.get_running_loop().create_task(self._run(job, claim), name=f"oban-job-{job.id}")
        assert job.id is not None
        self._running[job.id] = task

    async def _run(self, job: Job[Any], claim: datetime) -> None:
        assert job.id is not None
        ack: Ack | None
        try:
            ack = await execute(job, claim, limiter=self._limiter)
        except asyncio.CancelledError:
            reason = self._interrupts.pop(job.id, "shutdown")
            if reason == "shutdown":
                entry = json.dumps(
                    {
                        "attempt": job.attempt,
                        "at": datetime.now(timezone.utc).isoformat(),
                        "kind": "interrupted",
                        "error": f"interrupted by shutdown of node {self.ctx.node}; returned to the queue",
                    }
                )
                ack = Ack(job.id, claim, "available", delay=0.0, error=entry, attempt_delta=-1)
            else:
                ack = None  # cancelled or deleted by a user: the row already says so
        except Exception as exc:  # execute() handles job errors; this is our bug, but never lose the job
            log.exception("job %s: executor failed", job.id)
            ack = _failure(job, claim, exc, None, "internal")
        finally:
            self._running.pop(job.id, None)
            self._interrupts.pop(job.id, None)
        if ack is not None:
            self._acks.append(ack)
        self._wake.set()


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
    """Write acks; returns the ids of rows left parked (settled later by ``driver.unpark``).

    Completions (with or without a recorded result) are written by one plain statement. Any other
    outcome may move a job back into its unique group (a snooze into the ``scheduled`` group, a retry,
    a return to the queue), so those are written by ``driver.transition``, which settles the key before
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
        await driver.transition("job_ack", conn, **_ack_params(other))
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


async def _on_skip(job: Job[Any]) -> None:
    """Run the worker's ``on_skip(job)`` for a job skipped by its limit (best effort, logged)."""
    try:
        spec = get_worker(job.worker)
    except UnknownWorker:
        return
    hook = getattr(spec.cls, "on_skip", None)
    log.info("job %s (%s) skipped: its limit key is busy", job.id, job.worker, extra={"job_id": job.id})
    if hook is None:
        return
    try:
        result = hook(spec.cls(), job)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("on_skip of job %s (%s) failed", job.id, job.worker)
