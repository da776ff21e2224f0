"""Stager: makes due ``scheduled`` and ``retryable`` jobs ``available`` and wakes their queues.

Runs on every node (staging is idempotent and cheap: one indexed statement), every ``interval``
seconds. Rows that re-enter their unique group are settled in the same transaction
(:func:`oban_py.db.parking.transition`), so no producer fetches one before its key is settled.

Options: ``interval`` (1.0 s, the ``stage_interval`` setting), ``batch`` (10,000 rows per run).
Emits ``duty.ran``.
"""

from __future__ import annotations

from pydantic import Field

from ...db import parking
from .duty import Duty, DutyConfig

__all__ = ["Stager", "StagerConfig"]


class StagerConfig(DutyConfig):
    interval: float = Field(default=1.0, gt=0, le=3600)
    batch: int = Field(default=10_000, ge=1, le=1_000_000)


class Stager(Duty[StagerConfig]):
    name = "stager"

    async def run_once(self) -> None:
        driver = self.ctx.driver
        rows = await parking.transition(
            driver, "job_stage", channel=driver.insert_channel, limit=self.config.batch
        )
        self.ctx.wake({r["queue"] for r in rows})
