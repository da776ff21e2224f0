"""One scheduler pass: enqueue the due ticks of every recurring task, exactly once across the cluster.

Exactly once is the unique index's job, not the scheduler's: the job of a tick carries meta
``{"cron": <task>, "cron_at": <tick, UTC ISO 8601>}`` and unique options whose explicit ``key`` is that
pair, in group ``all``, so the jobs table's partial unique index (``oban_jobs_unique_idx``) refuses a
second job for the same tick whoever inserts it: the schedulers of several nodes, a pass repeated after
a restart. The key is explicit so that a worker's own ``unique_key`` hook never replaces it (every tick
would get the worker's key, and the task would run once).
``oban_cron`` (one row per task) only says where each task got to, so a pass knows which ticks are due,
and holds the cluster-wide pause.

Which ticks a pass enqueues, for a task last enqueued at ``last_at``:

* every tick in ``(last_at, now]`` that is younger than ``grace`` seconds: a late tick (the scheduler
  paused by a leader failover, a slow database) is still run;
* if there is none but older ones were missed (the cluster was down), the latest of those only;
* a task seen for the first time starts from ``now``: deploying an hourly task at 10:30 does not run
  the 10:00 tick. Resuming a paused task also starts from the resume.

A task whose ticks cannot be computed or built is skipped (logged once per task and error), so it never
holds up the others; the schedule is checked when the task is loaded, so this is a safety net.

The pass takes ``now`` as a parameter (the duty gives it the wall clock), so a test can drive it with
a fixed clock across a DST change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .. import _insert
from ..unique import UniqueOptions
from ..worker_spec import get_worker
from .schedule import Schedule
from .task import CronTask

if TYPE_CHECKING:
    from ..db.driver import Driver
    from ..job import Job

__all__ = ["CRON_UNIQUE", "MAX_LATE", "due_ticks", "manual_job", "run_pass", "tick_job", "tick_key"]

log = logging.getLogger("oban_py.cron")


def tick_key(job: Job[Any]) -> list[Any]:
    """The unique key of a tick's job: ``["oban_py.cron", task, tick]`` (from its meta)."""
    return ["oban_py.cron", job.meta["cron"], job.meta["cron_at"]]


#: What makes the job of a tick unique: task name and tick, in every state, for ever (until pruned;
#: by then the tick is far behind every task's ``last_at`` and never due again). ``key`` is explicit:
#: a worker's ``unique_key`` hook applies only when the options have no key of their own.
CRON_UNIQUE = UniqueOptions(
    fields=("meta",), keys=("cron", "cron_at"), group="all", period=None, key=tick_key
)
#: (task, error) pairs already logged by a pass, so a broken task is reported once, not every second.
_REPORTED: set[tuple[str, str]] = set()
#: Most late ticks of one task enqueued in one pass (a 1-second task after a 60 s failover: 60).
MAX_LATE = 1000


def due_ticks(schedule: Schedule, last_at: datetime, now: datetime, grace: float) -> list[datetime]:
    """The ticks a pass at ``now`` enqueues for a task last enqueued at ``last_at`` (module docstring)."""
    if now <= last_at:
        return []
    recent = schedule.ticks_between(max(last_at, now - timedelta(seconds=grace)), now, MAX_LATE)
    return recent or schedule.ticks_between(last_at, now, 1)


def tick_job(task: CronTask, at: datetime) -> Job[Any]:
    """The job of ``task``'s tick at ``at``: the worker's defaults, the task's options, the tick key."""
    options = dict(task.options)
    meta = {**options.pop("meta", {}), "cron": task.name, "cron_at": at.isoformat()}
    job = get_worker(task.worker).new(dict(task.args), meta=meta, **options)
    job.unique = CRON_UNIQUE  # replaces the worker's own: the tick is the identity
    return job


def manual_job(task: CronTask) -> Job[Any]:
    """A job of ``task`` run now by hand (no tick, so no tick key; the worker's unique options hold)."""
    options = dict(task.options)
    meta = {**options.pop("meta", {}), "cron": task.name, "cron_manual": True}
    return get_worker(task.worker).new(dict(task.args), meta=meta, **options)


async def run_pass(
    driver: Driver,
    tasks: Mapping[str, CronTask],
    now: datetime,
    *,
    grace: float = 60.0,
    chunk_size: int = 5000,
    max_args_bytes: int = 1024 * 1024,
) -> list[Job[Any]]:
    """Enqueue what is due at ``now``; returns one job per enqueued tick (the holder if it existed)."""
    names = [name for name, task in tasks.items() if task.enabled]
    if not names:
        return []
    states = {row["name"]: row for row in await driver.fetch("cron_states", names=names)}
    unseen = [name for name in names if name not in states]
    if unseen:
        await driver.execute("cron_seen", names=unseen, now=now)
    jobs: list[Job[Any]] = []
    ticks: list[tuple[str, datetime]] = []
    for name in names:
        state = states.get(name)
        if state is None or state["paused"] or state["last_at"] is None:
            continue
        task = tasks[name]
        try:  # one broken task must not block the others
            due = [(at, tick_job(task, at)) for at in due_ticks(task.schedule, state["last_at"], now, grace)]
        except Exception as exc:
            _report(name, exc)
            continue
        for at, job in due:
            ticks.append((name, at))
            jobs.append(job)
    if not jobs:
        return []
    done = await _insert.insert_jobs(driver, jobs, None, chunk_size=chunk_size, max_args_bytes=max_args_bytes)
    # One result per tick, in order. A holder (the tick's job already existed) normally is that tick's
    # job; if it is some other job holding the same key, the tick still counts as done (its key is
    # taken) but that job is not recorded as the task's last job.
    job_ids = [
        job.id if (job.meta.get("cron"), job.meta.get("cron_at")) == (name, at.isoformat()) else None
        for (name, at), job in zip(ticks, done, strict=True)
    ]
    # A crash before this line only repeats the inserts next pass, where the unique key refuses them.
    await driver.execute(
        "cron_advance", names=[n for n, _ in ticks], ats=[at for _, at in ticks], job_ids=job_ids
    )
    return done


def _report(name: str, exc: Exception) -> None:
    """Log a task the pass skipped, once per task and error."""
    key = (name, f"{type(exc).__name__}: {exc}")
    if key in _REPORTED:
        return
    if len(_REPORTED) >= 1024:
        _REPORTED.clear()
    _REPORTED.add(key)
    log.error("cron %s: skipped, its ticks cannot be enqueued: %s", name, key[1], exc_info=exc)
