"""Poller: one query finds the queues with available jobs and wakes their producers.

The fallback for a missed NOTIFY (``notifier = "poll"``, a reconnecting LISTEN connection) and for
keyed slots freed on other nodes. Idle cost does not grow with the number of queues: one statement
per ``interval`` for the whole node, skipped while every queue is paused. Selections with wildcard
patterns are re-resolved against the queues it finds.

Options: ``interval`` (the ``poll_interval`` setting, 1.0 s). Emits ``duty.ran``.
"""

from __future__ import annotations

from pydantic import Field

from ..queues import QueueSet
from .duty import Duty, DutyConfig, DutyContext

__all__ = ["Poller", "PollerConfig"]


class PollerConfig(DutyConfig):
    interval: float = Field(default=1.0, gt=0, le=3600)


class Poller(Duty[PollerConfig]):
    name = "poller"

    def __init__(self, ctx: DutyContext, config: PollerConfig, *, queues: QueueSet) -> None:
        super().__init__(ctx, config)
        self.queues = queues

    async def run_once(self) -> None:
        if not self.queues.any_active():
            return
        available = [r["queue"] for r in await self.ctx.driver.fetch("queue_names_available")]
        for queue in available:
            for producer in self.queues.serving(queue):
                producer.notify()
        if self.queues.has_patterns:
            self.queues.expand(available)
            for producer in self.queues:
                if producer.patterns and any(q in available for q in producer.queues):
                    producer.notify()
