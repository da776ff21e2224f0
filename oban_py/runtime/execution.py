"""One attempt of one job on this node, and how the engine stops it.

:class:`Execution` records the attempt's task, its thread (sync bodies, see :mod:`.threads`) and the
reason the engine stopped it, if it did; :meth:`Execution.interrupt` is the only way the engine stops a
job. Job code sees the attempt through :func:`current_job` and :func:`stop_requested`.
"""

from __future__ import annotations

import asyncio
import contextvars
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..job import Job

if TYPE_CHECKING:
    from .threads import SyncBody

__all__ = [
    "CANCELLED",
    "DELETED",
    "REVOKED",
    "SHUTDOWN",
    "TIMEOUT",
    "Execution",
    "Interrupted",
    "current_job",
    "stop_requested",
    "uncancel",
]

current: contextvars.ContextVar[Job[Any] | None] = contextvars.ContextVar("oban_py_current_job", default=None)
running: contextvars.ContextVar[Execution | None] = contextvars.ContextVar("oban_py_execution", default=None)

# Why the engine stopped a running job (Execution.reason).
SHUTDOWN = "shutdown"  # the node is stopping: back to the queue, attempt not counted
REVOKED = "revoked"  # the node lost (or may have lost) its claim: back to the queue if still ours
CANCELLED = "cancelled"  # cancel_job
DELETED = "deleted"  # delete_job: the row is gone
TIMEOUT = "timeout"  # a sync job's thread outlived its timeout


def current_job() -> Job[Any] | None:
    """The job being executed in this task or thread (None outside a job)."""
    return current.get()


def stop_requested() -> bool:
    """True once the engine asked the running job to stop (its timeout passed, ``cancel_job``,
    shutdown, a lost claim). A long ``def process`` should check it and return: a thread cannot be
    killed, and the job holds its slot until it returns."""
    execution = running.get()
    return execution is not None and execution.reason is not None


class Interrupted(BaseException):
    """Raised inside a sync job's thread when the engine stops it (timeout, cancel, shutdown).

    A ``BaseException``, so ``except Exception`` in job code does not swallow it.
    """


class Execution:
    """One attempt of one job on this node: its task, its thread (sync jobs) and why the engine
    stopped it, if it did. ``interrupt`` is the only way the engine stops a job."""

    __slots__ = (
        "cancelled",
        "claim",
        "interruptible",
        "job",
        "reason",
        "running",
        "started",
        "task",
        "thread",
    )

    def __init__(self, job: Job[Any], claim: datetime) -> None:
        self.job = job
        self.claim = claim
        self.reason: str | None = None
        self.task: asyncio.Task[Any] | None = None
        self.thread: SyncBody | None = None
        self.interruptible = False
        self.running = False  # the task has taken its first step (before that, cancel() would skip it)
        self.cancelled = False
        self.started = 0.0

    def interrupt(self, reason: str) -> None:
        if self.reason is None or self.reason == TIMEOUT:
            self.reason = reason
        if self.thread is not None and self.interruptible:
            self.thread.interrupt()
        # A task that has not started yet sees ``reason`` at its first step (cancelling it before then
        # would skip the code that releases its slot).
        if self.task is not None and self.running and not self.cancelled and not self.task.done():
            self.cancelled = True  # once: a second cancel would cut short the job's own cleanup
            self.task.cancel()

    def interrupted(self) -> bool:
        """The engine stopped this job (a timeout is the job's own outcome, not an interrupt)."""
        return self.reason is not None and self.reason != TIMEOUT

    @property
    def body_alive(self) -> bool:
        """True while the job's code may still run (its task, or its thread, has not ended)."""
        if self.thread is not None and self.thread.is_alive():
            return True
        return self.task is not None and not self.task.done()


def uncancel() -> None:
    """Forget a swallowed cancellation request (3.11+), so later awaits in this task behave."""
    task: Any = asyncio.current_task()
    if task is not None and hasattr(task, "uncancel"):
        while task.cancelling():
            task.uncancel()
