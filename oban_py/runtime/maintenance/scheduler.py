"""Scheduler (leader only, or every node when ``leadership`` is off): enqueues recurring tasks' ticks.

Each run is one :func:`oban_py.cron.scheduler.run_pass` at the wall clock: one query for the tasks'
states, one insert for the due ticks, one update of the states. Running it on the leader alone saves
those queries on every other node; it is not what makes a tick run once (each tick's job has a unique
key), so a deposed leader still mid-pass, or a second scheduler, inserts nothing twice. Ticks missed
during a leader failover are younger than ``grace`` and enqueued late by the next leader.

Options: ``interval`` (1 s: the resolution of a seconds schedule; a minute schedule costs the same
three cheap queries a second, only on the leader), ``grace`` (60 s: longer than a failover at the
default ``heartbeat_interval``, whose leader ``ttl`` is 15 s). Emits ``duty.ran``.
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
    leader_only = True

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
