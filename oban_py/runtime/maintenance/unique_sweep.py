"""Unique sweep (leader only): clears unique keys that no longer guard anything, and settles parked rows.

A key stays on a job's row after the job leaves its unique group (it finishes, or a period passes);
the sweep clears it in batches, and retries rows still parked because an uncommitted holder blocked
them past the lock timeout (see :mod:`oban_py.db.parking`).

Options: ``interval`` (10 s). Emits ``duty.ran``.
"""

from __future__ import annotations

from pydantic import Field

from ...db import parking
from .duty import Duty, DutyConfig

__all__ = ["UniqueSweep", "UniqueSweepConfig"]


class UniqueSweepConfig(DutyConfig):
    interval: float = Field(default=10.0, gt=0, le=3600)


class UniqueSweep(Duty[UniqueSweepConfig]):
    name = "unique-sweep"
    leader_only = True

    async def run_once(self) -> None:
        await parking.sweep(self.ctx.driver)
