"""Job callbacks: methods a worker class may define, called around each attempt.

``before_process(job)`` runs before ``process``; then, by outcome, ``on_success(job)``, or
``on_failure(job, error)`` (every failed attempt) followed by ``on_discard(job, error)`` on the last
one; then ``after_process(job, outcome)`` with an :class:`Outcome`. (``on_skip(job)`` runs for a job
skipped by its limit, see docs/concurrency.md.) Each may be sync or async.

They observe, they never decide: a callback that raises (``BaseException`` included) is logged with
its traceback and changes nothing, neither the job's state, attempt nor errors, and ``process`` runs
even when ``before_process`` failed. Each gets at most ``CALLBACK_TIMEOUT`` seconds, so the ack waits
for them no longer than that; sync ones run on a thread of their own, so they never block the event
loop. An attempt the engine stops and puts back in the queue (shutdown, a lost claim) or whose row is
deleted has no outcome and no after-callbacks: it does not count as an attempt.

Which callbacks a class has is looked up once per class (:func:`callbacks_for`), so a worker without
any pays one dictionary lookup per job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..runtime.execution import CANCELLED, Execution
from .calling import call_contained

if TYPE_CHECKING:
    from ..runtime.outcome import Ack

__all__ = ["CALLBACK_NAMES", "CALLBACK_TIMEOUT", "Outcome", "WorkerCallbacks", "callbacks_for"]

log = logging.getLogger("oban_py.hooks")

OutcomeState = Literal["completed", "retryable", "discarded", "cancelled", "snoozed"]
CALLBACK_NAMES = ("before_process", "on_success", "on_failure", "on_discard", "after_process")
#: Seconds one callback may take: the longest it can delay the job's ack (and its slot's reuse).
CALLBACK_TIMEOUT = 5.0

# Ack states that are outcomes of the attempt (an ack to "available" is an interrupt: no outcome).
_STATES: dict[str, OutcomeState] = {
    "completed": "completed",
    "retryable": "retryable",
    "discarded": "discarded",
    "cancelled": "cancelled",
    "scheduled": "snoozed",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended, as ``after_process`` sees it."""

    #: ``"completed"``, ``"retryable"``, ``"discarded"``, ``"cancelled"`` or ``"snoozed"``.
    state: OutcomeState
    #: What ``process`` raised (retryable and discarded attempts; a timeout is a ``TimeoutError``).
    error: BaseException | None = None
    #: Seconds until the retry (retryable) or the wake-up (snoozed).
    delay: float | None = None

    @property
    def failed(self) -> bool:
        return self.state in ("retryable", "discarded")


@dataclass(frozen=True, slots=True)
class WorkerCallbacks:
    """The callbacks one worker class defines (names only; bound methods are looked up per attempt)."""

    names: frozenset[str]

    async def before(self, instance: Any, execution: Execution) -> None:
        if "before_process" in self.names:
            await _call(instance, "before_process", (execution.job,), execution)

    async def after(
        self, instance: Any, execution: Execution, ack: Ack | None, error: BaseException | None
    ) -> None:
        """Run the callbacks the attempt's ack calls for; ``error`` is what ``process`` raised."""
        state = _STATES.get(ack.state) if ack is not None else None
        if ack is None or state is None:
            return
        job = execution.job
        failed = state in ("retryable", "discarded")
        calls: list[tuple[str, tuple[Any, ...]]] = []
        if state == "completed":
            calls.append(("on_success", (job,)))
        elif failed:
            calls.append(("on_failure", (job, error)))
            if state == "discarded":
                calls.append(("on_discard", (job, error)))
        outcome = Outcome(state, error if failed else None, ack.delay)
        calls.append(("after_process", (job, outcome)))
        for name, args in calls:
            if name not in self.names:
                continue
            if execution.interrupted() and execution.reason != CANCELLED:
                return  # shutdown or a lost claim while a callback ran: let the node stop
            await _call(instance, name, args, execution)


async def _call(instance: Any, name: str, args: tuple[Any, ...], execution: Execution) -> None:
    job = execution.job
    extra = {"job_id": job.id, "worker": job.worker, "queue": job.queue, "callback": name}
    try:
        method = getattr(instance, name)
    except BaseException:  # a property that raises (anything), say: contained like the call itself
        log.error("%s of job %s (%s) could not be read; ignored", name, job.id, job.worker, exc_info=True)
        method = None
    if method is None or not callable(method):
        return
    await call_contained(
        method, args, limit=CALLBACK_TIMEOUT, what=f"{name} of job {job.id} ({job.worker})", extra=extra
    )


_CACHE: dict[type, WorkerCallbacks | None] = {}


def callbacks_for(cls: type) -> WorkerCallbacks | None:
    """The callbacks ``cls`` defines, or None when it defines none (the common case, kept cheap)."""
    try:
        return _CACHE[cls]
    except KeyError:
        pass
    names = frozenset(name for name in CALLBACK_NAMES if callable(getattr(cls, name, None)))
    found = WorkerCallbacks(names) if names else None
    _CACHE[cls] = found
    return found
