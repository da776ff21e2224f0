"""Recurring tasks on the facade: list them, pause and resume them cluster-wide, run one now.

The tasks are this process's (``[cron.<name>]`` tables and ``cron=`` workers, see
:func:`oban_py.cron.load_tasks`); their pause, last tick and last job are the cluster's, in
``oban_cron``. A pause is stored there and read by whichever node schedules, so it holds on every node
and survives restarts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from .. import _insert
from ..cron.registry import load_tasks
from ..cron.scheduler import manual_job
from ..cron.task import CronTask
from ..errors import ValidationError
from ..job import Job
from .base import EngineBase

__all__ = ["CronAPI", "CronTaskInfo"]


@dataclass(frozen=True)
class CronTaskInfo:
    """One recurring task as ``cron_tasks()`` and ``oban-py cron list`` show it."""

    name: str
    worker: str
    schedule: str
    timezone: str
    enabled: bool
    paused: bool
    #: The next tick the scheduler will enqueue (None when disabled or paused).
    next_at: datetime | None
    #: The latest tick enqueued, and the job of the latest tick or manual run.
    last_at: datetime | None
    last_job_id: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 text."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}


class CronAPI(EngineBase):
    async def cron_tasks(self, *, now: datetime | None = None) -> list[CronTaskInfo]:
        """Every recurring task of this process, with its cluster-wide state, by name."""
        tasks = load_tasks(self.config)
        now = now or datetime.now(timezone.utc)
        rows = await self.driver.fetch("cron_states", names=list(tasks))
        states = {row["name"]: row for row in rows}
        out = []
        for name, task in tasks.items():
            state = states.get(name)
            paused = bool(state and state["paused"])
            out.append(
                CronTaskInfo(
                    name=name,
                    worker=task.worker,
                    schedule=task.schedule.expression,
                    timezone=task.schedule.timezone,
                    enabled=task.enabled,
                    paused=paused,
                    next_at=_next_at(task, now) if task.enabled and not paused else None,
                    last_at=state["last_at"] if state else None,
                    last_job_id=state["last_job_id"] if state else None,
                )
            )
        return out

    async def pause_cron(self, name: str) -> None:
        """Stop enqueuing ``name`` on every node, until ``resume_cron`` (stored: survives restarts)."""
        self._cron_task(name)
        await self.driver.execute("cron_pause", name=name, paused=True)

    async def resume_cron(self, name: str) -> None:
        """Enqueue ``name`` again from its next tick (the ticks missed while paused are not run).

        "From now" is the database's clock, not this host's.
        """
        self._cron_task(name)
        await self.driver.execute("cron_pause", name=name, paused=False)

    async def run_cron(self, name: str) -> Job[Any]:
        """Insert a job of ``name`` now, whatever its schedule or pause (``meta.cron_manual`` is set)."""
        job = manual_job(self._cron_task(name))
        (done,) = await _insert.insert_jobs(
            self.driver,
            [job],
            None,
            chunk_size=self.config.insert_chunk_size,
            max_args_bytes=self.config.max_args_bytes,
        )
        await self.driver.execute("cron_ran", name=name, job_id=done.id)
        return done

    def _cron_task(self, name: str) -> CronTask:
        tasks = load_tasks(self.config)
        if name not in tasks:
            raise ValidationError("cron", name, f"is not a recurring task; tasks are {sorted(tasks)}")
        return tasks[name]


def _next_at(task: CronTask, now: datetime) -> datetime | None:
    """The task's next tick; None if croniter cannot find one (the schedule is checked on load)."""
    try:
        return task.schedule.next_after(now)
    except (ValueError, OverflowError):
        return None
