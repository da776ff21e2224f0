"""The per-queue producer: fetch, run, ack.

One producer per queue per node. Each wake-up (a NOTIFY for its queue, a finished job, the node's
poller seeing available jobs) completes the jobs that finished and claims up to ``limit - running``
more, in one round trip (``oban_fetch_v1``). Jobs run as asyncio tasks; their outcomes are queued as
acks and written together on the next cycle, so a busy queue costs one round trip per batch of jobs,
not per job. Outcomes other than completion (retries, snoozes, cancels) are written first, in a
transaction that settles unique keys.

Failure handling (``docs/guarantees.md``):

* Every cycle has a deadline (``CYCLE_DEADLINE``): a statement stuck on a dead socket is abandoned,
  its connection discarded, and the cycle retried with backoff.
* A lost connection during an ack keeps the acks and retries them (the claim guard makes a repeated
  ack harmless). An ack the database refuses (not a lost connection) is retried alone, then replaced
  by a plain recorded failure, so one job's outcome can never wedge the queue.
* A lost connection during a fetch leaves its outcome unknown: the fetch may have claimed rows we
  never saw. The node then reconciles (see :class:`ClaimGate`): it puts back every job claimed by this
  node that none of its producers holds.
* Shutdown stops fetching, lets running jobs finish for up to ``shutdown_timeout``, then interrupts
  them and puts them back in the queue without counting the attempt, but only once their bodies
  have ended: a body that does not stop keeps its claim (see ``stuck``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..db import parking
from ..db.connect import is_transient
from ..db.rows import job_from_record
from ..errors import DatabaseUnavailable, UnknownWorker
from ..hooks.callbacks import CALLBACK_TIMEOUT
from ..hooks.calling import call_contained
from ..hooks.reporting import ErrorReporter
from ..job import Job
from ..worker_spec import get_worker
from .backoff import Backoff
from .claims import ClaimGate, Target, claim_jobs, fallback, write_acks
from .execution import REVOKED, SHUTDOWN, Execution
from .executor import execute
from .outcome import Ack, failure, scrub

if TYPE_CHECKING:
    from ..db.driver import Driver

__all__ = ["Producer", "ProducerContext"]

log = logging.getLogger("oban_py.producer")

# A cycle (acks plus fetch) that takes longer than this is abandoned and retried: a statement on a
# black-holed connection would otherwise never return.
CYCLE_DEADLINE = 15.0
# After shutdown_timeout, interrupted jobs get this long to end before they count as stuck.
INTERRUPT_GRACE = 3.0
# Then the last acks get this long to be written (a database that cannot be reached does not hold
# shutdown up: the jobs stay executing and are rescued).
FLUSH_TIMEOUT = 3.0
_timeout: Any = getattr(asyncio, "timeout", None)


@dataclass
class ProducerContext:
    """What a producer needs from its node."""

    driver: Driver
    node: str
    instance: str
    poll_interval: float
    spawn: Callable[[Coroutine[Any, Any, Any]], Any]
    gate: ClaimGate = field(default_factory=ClaimGate)
    reconcile: Callable[[], None] = lambda: None
    # False while the node's lease may have run out: claims made then could be rescued at once.
    may_claim: Callable[[], bool] = lambda: True
    #: Where failed cycles are reported (``on_error``), once per outage.
    reporter: ErrorReporter = field(default_factory=ErrorReporter)


class Producer:
    """Fetches and runs the jobs of one queue (or an ordered selection of queues) on this node.

    Claims go through ``oban_fetch_v1`` (``sql/functions/oban_fetch_v1.sql``, see :mod:`.claims`), which
    also completes the previous batch and enforces keyed, global and rate limits under advisory locks.
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
        self._running: dict[int, Execution] = {}
        self._acks: list[Ack] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._detached = False  # shutdown gave up waiting for stuck bodies
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff()
        self._riding = True  # completions ride along with the fetch (off after a refused fetch)
        self._failing = False  # a cycle failed since the last good one (an on_error episode is open)
        self.cycle_started: float | None = None  # monotonic start of the cycle in flight
        self.completed = 0
        self.stuck: list[Execution] = []

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

    def held(self) -> list[int]:
        """Ids of the jobs this producer holds a claim on: running ones and unwritten acks."""
        return [*self._running, *(a.id for a in self._acks)]

    def executions(self) -> list[Execution]:
        return list(self._running.values())

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.notify()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.notify()

    def interrupt(self, job_id: int, reason: str) -> bool:
        """Stop a running job (cancel_job, delete_job, shutdown, a lost claim). True if it ran here."""
        execution = self._running.get(job_id)
        if execution is None:
            return False
        execution.interrupt(reason)
        return True

    def revoke(self) -> int:
        """This node's claims may have been taken over (missed heartbeats): stop every running job."""
        for execution in self._running.values():
            execution.interrupt(REVOKED)
        return len(self._running)

    async def stop(self, timeout: float) -> None:
        """Stop fetching, wait up to ``timeout`` for running jobs, then interrupt the rest. A job whose
        body does not end is left claimed (``stuck``), never handed back while it may still run."""
        self._stopping = True
        self.notify()
        tasks = [e.task for e in self._running.values() if e.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
            if pending:
                log.warning(
                    "queue %s: %d job(s) still running after %.1fs; interrupting them and putting them "
                    "back in the queue",
                    self.queue,
                    len(pending),
                    timeout,
                    extra={"queue": self.queue},
                )
                for execution in list(self._running.values()):
                    if execution.task in pending:
                        execution.interrupt(SHUTDOWN)
                _, pending = await asyncio.wait(pending, timeout=INTERRUPT_GRACE)
            if pending:
                self.stuck = [e for e in self._running.values() if e.task in pending]
                self._detached = True
                log.error(
                    "queue %s: job(s) %s did not stop when interrupted; they keep their claim while their "
                    "bodies run (and are rescued once this process is gone)",
                    self.queue,
                    ", ".join(str(e.job.id) for e in self.stuck),
                    extra={"queue": self.queue, "job_ids": [e.job.id for e in self.stuck]},
                )
        self.notify()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=FLUSH_TIMEOUT)
            except asyncio.TimeoutError:
                log.error(
                    "queue %s: could not write %d final ack(s) in %.0fs; the jobs stay executing until "
                    "rescued",
                    self.queue,
                    len(self._acks),
                    FLUSH_TIMEOUT,
                    extra={"queue": self.queue},
                )
                self._task.cancel()

    # -- loop -------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if self._stopping and not self._acks and (not self._running or self._detached):
                return
            await self._wake.wait()
            self._wake.clear()
            try:
                if _timeout is not None:  # 3.11+: no extra task per cycle
                    async with _timeout(CYCLE_DEADLINE):
                        await self._cycle()
                else:  # pragma: no cover - Python 3.10
                    await asyncio.wait_for(self._cycle(), CYCLE_DEADLINE)
                self._backoff.reset()
                if self._failing:
                    self._failing = False
                    self.ctx.reporter.recovered("producer", self.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._failed(exc)

    async def _failed(self, exc: Exception) -> None:
        delay = self._backoff.next()
        extra = {"queue": self.queue}
        if isinstance(exc, asyncio.TimeoutError):
            exc = DatabaseUnavailable(f"cycle took longer than {CYCLE_DEADLINE:.0f}s")
            self.ctx.reconcile()
        if isinstance(exc, DatabaseUnavailable):
            level = logging.WARNING if self._backoff.failures in (1, 10, 100) else logging.DEBUG
            log.log(level, "queue %s: %s; retrying in %.2fs", self.queue, exc, delay, extra=extra)
        else:
            # A fetch the database refuses: keep writing acks on their own meanwhile.
            self._riding = False
            log.exception(
                "queue %s: producer cycle failed; retrying in %.2fs", self.queue, delay, extra=extra
            )
        self._failing = True
        self.ctx.reporter.report(exc, "producer", self.name)
        if self._stopping and self._backoff.failures > 20:
            # Give up on the acks (the jobs are rescued); running jobs are stop()'s to handle.
            log.error(
                "queue %s: giving up on %d ack(s) while stopping; their jobs stay executing until rescued",
                self.queue,
                len(self._acks),
                exc_info=exc,
                extra=extra,
            )
            self.ctx.reporter.report(exc, "producer", self.name, final=True)
            self._acks.clear()
            self._detached = True
            return
        await asyncio.sleep(delay)
        self._wake.set()

    async def _cycle(self) -> None:
        gate = self.ctx.gate
        await gate.enter()
        self.cycle_started = time.monotonic()
        acks, self._acks = self._acks, []
        try:
            await self._cycle_with(acks)
        except BaseException:
            # Keep them for the next cycle. Writing an ack twice is harmless: the claim guard
            # turns the second write into a no-op.
            self._acks[:0] = acks
            raise
        finally:
            self.cycle_started = None
            gate.leave()

    async def _cycle_with(self, acks: list[Ack]) -> None:
        demand = 0 if (self.paused or self._stopping) else self.limit - len(self._running)
        if demand > 0 and not self.ctx.may_claim():
            demand = 0
        if not acks and demand <= 0:
            return
        driver = self.ctx.driver
        parked: list[int] = []
        async with driver.connection() as conn:
            # Plain completions ride along with the fetch; everything else is written first.
            ride = demand > 0 and self._riding
            riding = [a for a in acks if a.simple] if ride else []
            rest = [a for a in acks if not (ride and a.simple)]
            if rest:
                parked = await self._write_acks(conn, rest)
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
                    self.ctx.reconcile()
                    raise
                self._riding = True
                self.completed += len(riding)
                # Stopping, or the lease ran out while the fetch was in flight (the claims may already
                # be rescued elsewhere): hand the claims straight back instead of running them.
                give_back = self._stopping or not self.ctx.may_claim()
                for row in rows:
                    kind = row["kind"]
                    if kind == "parked":
                        parked.append(row["id"])
                    elif kind == "skipped":
                        self.ctx.spawn(_on_skip(job_from_record(row)))
                    elif give_back:
                        back = Ack(row["id"], row["attempted_at"], "available", 0.0, attempt_delta=-1)
                        self._acks.append(back)
                        self._wake.set()
                    else:
                        self._launch(row)
                        if row["parked"]:
                            parked.append(row["id"])
        if parked:
            self.ctx.spawn(parking.unpark(driver, parked))

    async def _write_acks(self, conn: Any, acks: list[Ack]) -> list[int]:
        """Write acks; an ack the database refuses is isolated and replaced (see :func:`_fallback`)."""
        try:
            parked = await write_acks(self.ctx.driver, conn, acks)
        except Exception as exc:
            if is_transient(exc):
                raise
            parked = []
            for ack in acks:
                parked += await self._write_alone(conn, ack, exc if len(acks) == 1 else None)
        self.completed += len(acks)
        return parked

    async def _write_alone(self, conn: Any, ack: Ack, error: Exception | None) -> list[int]:
        driver = self.ctx.driver
        if error is None:
            try:
                return await write_acks(driver, conn, [ack])
            except Exception as exc:
                if is_transient(exc):
                    raise
                error = exc
        for attempt in (fallback(ack, error), Ack(ack.id, ack.claim, "discarded")):
            log.error(
                "job %s: the database refused its outcome (%s: %s); recording %s instead",
                ack.id,
                type(error).__name__,
                scrub(str(error), 300),
                attempt.state,
                extra={"job_id": ack.id, "queue": self.queue},
            )
            try:
                return await write_acks(driver, conn, [attempt])
            except Exception as exc:
                if is_transient(exc):
                    raise
                error = exc
        return []  # pragma: no cover - even a bare discard was refused; the reconcile puts it back

    def _launch(self, row: Any) -> None:
        job = job_from_record(row)
        execution = Execution(job, row["attempted_at"])
        execution.started = time.monotonic()
        assert job.id is not None
        self._running[job.id] = execution
        execution.task = asyncio.get_running_loop().create_task(
            self._run(execution), name=f"oban-job-{job.id}"
        )

    async def _run(self, execution: Execution) -> None:
        job = execution.job
        assert job.id is not None
        ack: Ack | None
        try:
            ack = await execute(execution)
        except BaseException as exc:  # execute() contains job errors; this is our bug: never lose the job
            log.exception("job %s: executor failed", job.id)
            ack = failure(job, execution.claim, exc, None, "internal")
        finally:
            self._running.pop(job.id, None)
        if ack is not None:
            self._acks.append(ack)
        self._wake.set()


async def _on_skip(job: Job[Any]) -> None:
    """Run the worker's ``on_skip(job)`` for a job skipped by its limit (contained like every job
    callback: bounded, logged, sync ones off the loop)."""
    try:
        spec = get_worker(job.worker)
    except UnknownWorker:
        return
    log.info("job %s (%s) skipped: its limit key is busy", job.id, job.worker, extra={"job_id": job.id})
    if getattr(spec.cls, "on_skip", None) is None:
        return
    what = f"on_skip of job {job.id} ({job.worker})"
    extra = {"job_id": job.id, "worker": job.worker, "callback": "on_skip"}
    try:
        hook = spec.cls().on_skip
    except Exception:
        log.exception("%s failed: the worker could not be instantiated", what, extra=extra)
        return
    await call_contained(hook, (job,), limit=CALLBACK_TIMEOUT, what=what, extra=extra)
