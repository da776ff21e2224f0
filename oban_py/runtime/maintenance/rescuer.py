"""Rescuer: puts back the jobs of processes that stopped heartbeating.

Every ``interval`` seconds, jobs claimed by an instance whose heartbeat is older than ``rescue_after``
(or that has no row in ``oban_nodes`` at all) go back to ``available`` (or are discarded on their last
attempt, or cancelled when a cancel was requested), and their queues are woken. A node that has just
(re)connected waits ``rescue_after`` of healthy heartbeats before rescuing anyone: after a database
outage the other nodes get the chance to heartbeat first.

Options: ``interval`` (the ``heartbeat_interval``, 5 s), ``rescue_after`` (30 s), ``batch`` (1,000 jobs
per run). Emits ``duty.ran``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import Field

from ...db import parking
from .duty import Duty, DutyConfig, DutyContext

__all__ = ["Rescuer", "RescuerConfig"]

log = logging.getLogger("oban_py.node")


class RescuerConfig(DutyConfig):
    interval: float = Field(default=5.0, gt=0, le=3600)
    rescue_after: float = Field(default=30.0, gt=0)
    batch: int = Field(default=1_000, ge=1, le=100_000)


class Rescuer(Duty[RescuerConfig]):
    name = "rescuer"
    run_at_start = False

    def __init__(
        self, ctx: DutyContext, config: RescuerConfig, *, healthy_since: Callable[[], float | None]
    ) -> None:
        super().__init__(ctx, config)
        self.healthy_since = healthy_since

    async def run_once(self) -> None:
        healthy = self.healthy_since()
        if healthy is None or time.monotonic() - healthy < self.config.rescue_after:
            return
        driver = self.ctx.driver
        rows = await parking.transition(
            driver,
            "job_rescue",
            instance=self.ctx.instance,
            rescue_after=self.config.rescue_after,
            limit=self.config.batch,
            channel=driver.insert_channel,
        )
        if rows:
            log.warning(
                "rescued %d job(s) from processes that stopped heartbeating",
                len(rows),
                extra={"job_ids": [r["id"] for r in rows][:50]},
            )
            self.ctx.wake({r["queue"] for r in rows})
