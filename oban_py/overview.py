"""What every queue and limit key is doing right now, across the cluster (``Oban.check_queues``).

Answers "why is nothing running?": per queue, how many jobs are in each state (finished ones until
they are pruned), which nodes run it with which limits and whether they are paused, and per keyed
limit, how many jobs run and how many wait for a slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .db.driver import Driver

__all__ = ["LimitStatus", "NodeQueue", "Overview", "QueueStatus", "overview"]


@dataclass
class NodeQueue:
    """One node's producer for a queue (from its last heartbeat)."""

    node: str
    limit: int
    running: int
    paused: bool


@dataclass
class QueueStatus:
    name: str
    available: int = 0
    executing: int = 0
    scheduled: int = 0
    retryable: int = 0
    completed: int = 0
    discarded: int = 0
    cancelled: int = 0
    nodes: list[NodeQueue] = field(default_factory=list)
    global_limit: int | None = None
    rate_limit: dict[str, Any] | None = None

    @property
    def paused(self) -> bool | None:
        """True when every node running it is paused, False when none is, None when some are (or no
        node runs it)."""
        states = {n.paused for n in self.nodes}
        return states.pop() if len(states) == 1 else None


@dataclass
class LimitStatus:
    """A keyed limit: ``waiting`` jobs are available but blocked while ``running >= limit``."""

    key: str
    queue: str
    running: int
    waiting: int
    limit: int
    skips: bool

    @property
    def blocked(self) -> bool:
        return self.waiting > 0 and self.running >= self.limit


@dataclass
class Overview:
    queues: list[QueueStatus]
    limits: list[LimitStatus]

    @property
    def blocked_jobs(self) -> int:
        """Jobs waiting on a keyed limit that is full right now."""
        return sum(lim.waiting for lim in self.limits if lim.blocked)

    def queue(self, name: str) -> QueueStatus | None:
        return next((q for q in self.queues if q.name == name), None)


async def overview(driver: Driver, *, limit_keys: int = 50) -> Overview:
    queues: dict[str, QueueStatus] = {}
    for row in await driver.fetch("queue_overview"):
        status = queues.setdefault(row["queue"], QueueStatus(row["queue"]))
        setattr(status, row["state"], row["n"])
    for row in await driver.fetch("node_list"):
        meta = json.loads(row["meta"])
        for name, info in meta.get("queues", {}).items():
            status = queues.setdefault(name, QueueStatus(name))
            status.nodes.append(NodeQueue(row["node"], info["limit"], info["running"], info["paused"]))
            for target in info.get("targets", []):
                member = queues.setdefault(target["queue"], QueueStatus(target["queue"]))
                member.global_limit = target.get("global_limit", member.global_limit)
                member.rate_limit = target.get("rate_limit", member.rate_limit)
    limits = [
        LimitStatus(r["key"], r["queue"], r["running"], r["waiting"], r["limit_to"], r["skips"])
        for r in await driver.fetch("limit_overview", limit=limit_keys)
    ]
    return Overview(sorted(queues.values(), key=lambda q: q.name), limits)
