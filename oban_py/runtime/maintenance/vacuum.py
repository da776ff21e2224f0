"""Vacuum (leader only): vacuums the jobs table once it holds ``threshold`` dead tuples.

A busy queue turns over its rows fast; between autovacuum runs dead tuples make fetches scan more.
This duty reads ``n_dead_tup`` every ``interval`` seconds and runs a plain ``VACUUM`` (no lock on
readers or writers) past the threshold. A role that does not own the table cannot vacuum it: the duty
says so once and stops trying (autovacuum still runs).

Options: ``interval`` (the ``vacuum_interval`` setting, 2 s), ``threshold`` (1,000). Emits ``duty.ran``.
"""

from __future__ import annotations

import logging

from pydantic import Field

from .duty import Duty, DutyConfig, DutyContext

__all__ = ["Vacuum", "VacuumConfig"]

log = logging.getLogger("oban_py.node")


class VacuumConfig(DutyConfig):
    interval: float = Field(default=2.0, gt=0)
    threshold: int = Field(default=1_000, ge=0)


class Vacuum(Duty[VacuumConfig]):
    name = "vacuum"
    leader_only = True
    deadline = 300.0

    def __init__(self, ctx: DutyContext, config: VacuumConfig) -> None:
        super().__init__(ctx, config)
        self.allowed = True

    async def run_once(self) -> None:
        if not self.allowed:
            return
        row = await self.ctx.driver.fetchrow("jobs_dead_tuples")
        if row is None:
            return
        if not row["owner"]:
            self.allowed = False
            log.info("not vacuuming the jobs table: this role does not own it (autovacuum still runs)")
            return
        if row["dead"] >= self.config.threshold:
            await self.ctx.driver.execute("jobs_vacuum")
