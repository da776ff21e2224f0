"""Leader: holds (or contends for) the cluster's leader lease in ``oban_leaders``.

Every ``interval`` seconds the node renews the lease if it holds it, or takes it if it has expired
(``ttl`` seconds after the holder's last renewal). Leader-only duties (pruner, unique sweep, vacuum)
run on the holder alone. A node that stops resigns and NOTIFYs, so another takes over at once
instead of after ``ttl``.

Options: ``interval`` (max(1 s, ``heartbeat_interval``)), ``ttl`` (max(3 s, 3 x ``heartbeat_interval``)),
``lease`` (the lease's name, "oban"). Emits ``leader.changed`` (``leader``: bool) and ``duty.ran``.
"""

from __future__ import annotations

import json
import logging

from pydantic import Field

from .duty import Duty, DutyConfig

__all__ = ["Leader", "LeaderConfig"]

log = logging.getLogger("oban_py.node")


class LeaderConfig(DutyConfig):
    interval: float = Field(default=5.0, gt=0, le=3600)
    ttl: float = Field(default=15.0, gt=0)
    lease: str = Field(default="oban", min_length=1, max_length=128)


class Leader(Duty[LeaderConfig]):
    name = "leader"
    is_leader = False

    async def run_once(self) -> None:
        holder = await self.ctx.driver.fetchval(
            "leader_elect",
            name=self.config.lease,
            instance=self.ctx.instance,
            node=self.ctx.node,
            ttl=self.config.ttl,
        )
        leader = holder is not None and str(holder) == self.ctx.instance
        if leader != self.is_leader:
            log.info(
                "node %s %s leadership",
                self.ctx.node,
                "took" if leader else "lost",
                extra={"node": self.ctx.node},
            )
            self.is_leader = leader
            self.ctx.events.emit("leader.changed", leader=leader)

    async def resign(self) -> None:
        """Give the lease up (at stop) and tell the other nodes to contend now."""
        if not self.is_leader:
            return
        driver = self.ctx.driver
        await driver.execute("leader_resign", name=self.config.lease, instance=self.ctx.instance)
        await driver.notify(driver.signal_channel, json.dumps({"kind": "leader"}))
        self.is_leader = False
        self.ctx.events.emit("leader.changed", leader=False)
