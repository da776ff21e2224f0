"""Scheduler (every node with recurring tasks): enqueues the tasks' ticks.

Tasks belong to a process (its oban.toml and imported ``cron=`` workers), so the duty runs on every
node that has tasks, not on the leader alone: the leader may be a node of another service on the same
database, without these tasks. Running it on several nodes is what the design allows: each tick's job
has a unique key, so the same tick inserted by two nodes (or repeated by a restarted one) is one job.

Each run is one :func:`oban_py.cron.scheduler.run_pass` at the wall clock: one query for the tasks'
states (a primary-key probe per task), one insert for the due ticks (only when one is due), one update
of the states. So a node with tasks costs the database one cheap query a second, and a due tick one
insert attempt per such node. Ticks missed while no node ran (a restart, a slow database) are younger
than ``grace`` and enqueued late by the next pass.

Options (fixed for a node's duty, not read from oban.toml; a duty built by hand takes others):
``interval`` (1 s: the resolution of a seconds schedule), ``grace`` (60 s). Emits ``duty.ran``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone

from pydantic import Field

from ...cron.scheduler import run_pass
from ...cron.task import CronTask
from .duty import Duty, DutyConfig, DutyContext

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger("oban_py.cron")


class SchedulerConfig(DutyConfig):
    interval: float = Field(default=1.0, gt=0, le=60)
    grace: float = Field(default=60.0, ge=0, le=86_400)
    chunk_size: int = Field(default=5000, ge=1, le=50_000)
    max_args_bytes: int = Field(default=1024 * 1024, ge=1024)


class Scheduler(Duty[SchedulerConfig]):
    name = "scheduler"
    leader_only = False  # every node with tasks: see the module docstring

    def __init__(self, ctx: DutyContext, config: SchedulerConfig, *, tasks: Mapping[str, CronTask]) -> None:
        super().__init__(ctx, config)
        self.tasks = dict(tasks)

    async def run_once(self) -> None:
        await self.tick(datetime.now(timezone.utc))

    async def tick(self, now: datetime) -> None:
        """One pass at ``now`` (a test's fixed clock, or the wall clock from :meth:`run_once`)."""
        cfg = self.config
        jobs = await run_pass(
            self.ctx.driver,
            self.tasks,
            now,
            grace=cfg.grace,
            chunk_size=cfg.chunk_size,
            max_args_bytes=cfg.max_args_bytes,
        )
        for job in jobs:
            if not job.conflicted:
                log.info(
                    "cron %s: enqueued job %s for %s",
                    job.meta["cron"],
                    job.id,
                    job.meta["cron_at"],
                    extra={"queue": job.queue},
                )
