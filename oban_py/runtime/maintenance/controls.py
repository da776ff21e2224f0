"""Controls: applies the queue controls stored in ``oban_queues`` (pause, resume, scale, start, stop) on
this node.

``pause_queue``/``resume_queue``/``scale_queue``/``start_queue``/``stop_queue`` store a control row and
NOTIFY every node, which runs this duty at once (:meth:`Duty.kick`); it also runs every ``interval``
seconds, the fallback for a missed NOTIFY. Stored controls win over the configuration and survive
restarts; the latest command wins. A control naming a node applies on that node only. A started queue
gets a producer here, a stopped one drains (see :meth:`QueueSet.apply_started`).

Options: ``interval`` (1.0 s). Emits ``controls.applied`` (``changed``: the queues started, stopped, or
whose paused state, limit or global limit changed) and ``duty.ran``.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from ..queues import QueueSet
from .duty import Duty, DutyConfig, DutyContext

__all__ = ["Controls", "ControlsConfig"]

log = logging.getLogger("oban_py.node")


class ControlsConfig(DutyConfig):
    interval: float = Field(default=1.0, gt=0, le=3600)


class Controls(Duty[ControlsConfig]):
    name = "controls"
    run_at_start = False

    def __init__(self, ctx: DutyContext, config: ControlsConfig, *, queues: QueueSet) -> None:
        super().__init__(ctx, config)
        self.queues = queues

    async def run_once(self) -> None:
        rows = await self.ctx.driver.fetch("queue_controls", node=self.ctx.node)
        desired: dict[str, dict[str, Any]] = {}
        for row in rows:  # oldest first: the latest command wins
            entry = desired.setdefault(row["name"], {})
            for field, column in (
                ("paused", "paused"),
                ("limit", "local_limit"),
                ("global", "global_limit"),
                ("started", "started"),
            ):
                if row[column] is not None:
                    entry[field] = row[column]
        changed = self.queues.apply_started(
            {n: (e["started"], e.get("limit")) for n, e in desired.items() if "started" in e}
        )
        for name, producer in self.queues.producers.items():
            qc = self.queues.specs[name]
            entry = desired.get(name, {})
            paused = entry.get("paused", qc.paused)
            limit = entry.get("limit", qc.limit)
            if paused != producer.paused:
                log.info("queue %s %s", name, "paused" if paused else "resumed", extra={"queue": name})
                producer.set_paused(paused)
                changed.append(name)
            if limit != producer.limit:
                log.info("queue %s scaled to %s", name, limit, extra={"queue": name})
                producer.set_limit(limit)
                changed.append(name)
            for target in producer.targets:
                configured = self.queues.target(target.queue).global_limit
                wanted = desired.get(target.queue, {}).get("global", configured)
                if wanted != target.global_limit:
                    log.info(
                        "queue %s global limit set to %s", target.queue, wanted, extra={"queue": target.queue}
                    )
                    target.global_limit = wanted
                    producer.notify()
                    changed.append(name)
        if self.queues.has_patterns:
            available = [r["queue"] for r in await self.ctx.driver.fetch("queue_names_available")]
            self.queues.expand(available)
        self.ctx.events.emit("controls.applied", changed=sorted(set(changed)))
