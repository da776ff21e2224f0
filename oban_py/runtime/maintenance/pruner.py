"""Pruner (leader only): deletes finished jobs older than ``max_age``.

``completed``, ``cancelled`` and ``discarded`` jobs whose last transition is older than ``max_age``
seconds are deleted in batches of ``batch`` rows, at most ``rounds`` batches per run, so one run never
holds locks for long and a backlog drains over a few runs.

Options: ``interval`` (the ``prune_interval`` setting, 60 s), ``max_age`` (the ``prune_after`` setting,
1 day), ``batch`` (10,000), ``rounds`` (10). Emits ``duty.ran``.
"""

from __future__ import annotations

from pydantic import Field

from .duty import Duty, DutyConfig

__all__ = ["Pruner", "PrunerConfig"]


class PrunerConfig(DutyConfig):
    interval: float = Field(default=60.0, gt=0)
    max_age: float = Field(default=86_400.0, gt=0)
    batch: int = Field(default=10_000, ge=1, le=1_000_000)
    rounds: int = Field(default=10, ge=1, le=1_000)


class Pruner(Duty[PrunerConfig]):
    name = "pruner"
    leader_only = True
    deadline = 300.0

    async def run_once(self) -> None:
        for _ in range(self.config.rounds):
            status = await self.ctx.driver.execute(
                "job_prune", max_age=self.config.max_age, limit=self.config.batch
            )
            if int(status.split()[-1]) < self.config.batch:
                break
