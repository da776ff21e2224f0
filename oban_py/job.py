"""Jobs, their states, and what ``process`` can return.

A :class:`Job` is a plain value: what to run (``worker`` + ``args``) and where/when (``queue``,
``priority``, ``scheduled_at``), plus what the database says about it once inserted (``id``, ``state``,
``attempt``, ``errors``...). ``conflicted`` is set by insert when a unique key was already held: the job
you get back is then the holder, with its real id and state.

Outcomes: returning normally completes the job. Return (or raise) :class:`Snooze`, :class:`Cancel` or
:class:`Record` to do something else; raising any other exception marks the attempt failed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .limits import LimitOptions
    from .unique import UniqueOptions

__all__ = ["Cancel", "Job", "JobControl", "JobState", "Record", "Snooze"]

ArgsT = TypeVar("ArgsT")


class JobState(str, enum.Enum):
    """Lifecycle states, in the order a job usually passes through them."""

    #: Waiting for ``scheduled_at`` (inserted for later, or snoozed).
    SCHEDULED = "scheduled"
    #: Ready to be fetched by a producer of its queue.
    AVAILABLE = "available"
    #: Claimed by a producer and running.
    EXECUTING = "executing"
    #: Failed an attempt; waiting for its backoff before it becomes available again.
    RETRYABLE = "retryable"
    #: Finished successfully.
    COMPLETED = "completed"
    #: Failed its last attempt (or was rescued with none left).
    DISCARDED = "discarded"
    #: Cancelled by the worker, by a user, or as a duplicate (see ``meta``).
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


FINISHED_STATES = frozenset({JobState.COMPLETED, JobState.DISCARDED, JobState.CANCELLED})


@dataclass(eq=False)
class Job(Generic[ArgsT]):
    """A unit of work, before or after it is inserted.

    Build one with ``Worker.new(...)`` rather than by hand: that validates options against the worker.
    Equality is by identity; compare ``id`` to know whether two objects are the same row.
    """

    worker: str
    args: ArgsT
    queue: str = "default"
    meta: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    priority: int = 0
    max_attempts: int = 20
    scheduled_at: datetime | None = None
    id: int | None = None
    state: JobState = JobState.AVAILABLE
    attempt: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    inserted_at: datetime | None = None
    attempted_at: datetime | None = None
    attempted_by: str | None = None
    completed_at: datetime | None = None
    cancelled_at: datetime | None = None
    discarded_at: datetime | None = None
    #: True when insert found this job's unique key already held; this object is then the holder.
    conflicted: bool = False
    #: Unique options this job is inserted with (from the worker, or overridden on ``new``).
    unique: UniqueOptions | None = field(default=None, repr=False)
    #: Keyed concurrency limit of this job's worker (see oban_py.limits).
    limit: LimitOptions | None = field(default=None, repr=False)
    #: Unique key hash this job was inserted with (None for non-unique jobs or jobs read back).
    unique_key: bytes | None = field(default=None, repr=False)

    @property
    def inserted(self) -> bool:
        """True once the job has a row (it was inserted, or is the holder of a conflict)."""
        return self.id is not None

    def _refresh_from(self, other: Job[Any]) -> None:
        """Copy the database-side fields of ``other`` into this object."""
        for name in (
            "id",
            "state",
            "queue",
            "worker",
            "meta",
            "tags",
            "priority",
            "max_attempts",
            "scheduled_at",
            "attempt",
            "errors",
            "result",
            "inserted_at",
            "attempted_at",
            "attempted_by",
            "completed_at",
            "cancelled_at",
            "discarded_at",
            "conflicted",
        ):
            setattr(self, name, getattr(other, name))
        self.args = other.args


class JobControl(Exception):
    """Base of the outcomes a job can return or raise instead of completing."""


class Snooze(JobControl):
    """Run again after ``seconds``. The attempt is not counted against ``max_attempts``."""

    def __init__(self, seconds: float, *, meta: dict[str, Any] | None = None) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"Snooze seconds must be a number >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.meta = meta or {}
        super().__init__(f"snooze for {seconds}s")


class Cancel(JobControl):
    """Stop here: the job becomes ``cancelled`` and ``reason`` is recorded in its errors."""

    def __init__(self, reason: str = "cancelled by worker") -> None:
        self.reason = reason
        super().__init__(reason)


class Record(JobControl):
    """Complete the job and keep ``value`` (JSON) as ``job.result``."""

    def __init__(self, value: Any) -> None:
        self.value = value
        super().__init__("record result")
