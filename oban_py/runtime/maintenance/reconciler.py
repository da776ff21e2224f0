"""Reconciler: puts back claims no producer holds, and finds cancel requests whose NOTIFY was missed.

A fetch whose reply was lost (a connection dropped mid-statement) may have claimed rows this node
never saw: they would stay ``executing`` under a live heartbeat forever. After such a fetch (the
producer kicks this duty) and every ``interval`` seconds, a cheap ungated look compares this node's
claims with what its producers hold; only when something is unaccounted for does it close the
:class:`~oban_py.runtime.claims.ClaimGate` (no fetch in flight) and put those jobs back.

Options: ``interval`` (10 s). Emits ``duty.ran``.
"""

from __future__ import annotations

import logging

from pydantic import Field

from ...db import parking
from ..claims import ClaimGate
from ..queues import QueueSet
from .duty import Duty, DutyConfig, DutyContext

__all__ = ["Reconciler", "ReconcilerConfig"]

log = logging.getLogger("oban_py.node")


class ReconcilerConfig(DutyConfig):
    interval: float = Field(default=10.0, gt=0, le=3600)


class Reconciler(Duty[ReconcilerConfig]):
    name = "reconciler"
    run_at_start = False

    def __init__(
        self, ctx: DutyContext, config: ReconcilerConfig, *, queues: QueueSet, gate: ClaimGate
    ) -> None:
        super().__init__(ctx, config)
        self.queues = queues
        self.gate = gate

    async def run_once(self) -> None:
        driver, instance = self.ctx.driver, self.ctx.instance
        claimed = {r["id"] for r in await driver.fetch("job_claims_of", instance=instance)}
        if claimed - self.queues.held():
            async with self.gate.exclusive():
                known = sorted(self.queues.held())
                rows = await parking.transition(driver, "job_release_unknown", instance=instance, known=known)
            if rows:
                log.info(
                    "put back %d job(s) claimed by an interrupted fetch",
                    len(rows),
                    extra={"node": self.ctx.node},
                )
                self.ctx.wake({r["queue"] for r in rows})
        # A cancel whose interrupt NOTIFY was missed (the notifier was reconnecting, or notifier =
        # "poll") still stops the job.
        for row in await driver.fetch("job_cancel_requested", instance=instance):
            self.queues.interrupt(row["id"], "cancelled")
