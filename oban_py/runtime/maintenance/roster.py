"""Which duties a node runs, built from its :class:`~oban_py.config.Config`.

Every node runs the rescuer, stager, controls, poller and reconciler; with ``leadership`` on (the
default) it also contends for the leader lease and, while leader, runs the unique sweep, the pruner
(unless ``prune_after`` is off) and the vacuum step (unless ``vacuum_interval`` is off). A node with
recurring tasks (``[cron.<name>]`` or ``cron=`` on a worker) runs the scheduler, leader or not: tasks
belong to a process, and the leader may be a node (another service on the database) without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...cron.registry import load_tasks
from .controls import Controls, ControlsConfig
from .duty import Duty, DutyContext
from .leader import Leader, LeaderConfig
from .poller import Poller, PollerConfig
from .pruner import Pruner, PrunerConfig
from .reconciler import Reconciler, ReconcilerConfig
from .rescuer import Rescuer, RescuerConfig
from .scheduler import Scheduler, SchedulerConfig
from .stager import Stager, StagerConfig
from .unique_sweep import UniqueSweep, UniqueSweepConfig
from .vacuum import Vacuum, VacuumConfig

if TYPE_CHECKING:
    from ...config import Config
    from ..claims import ClaimGate
    from ..queues import QueueSet

__all__ = ["Roster"]


@dataclass
class Roster:
    """A node's duties, by the names the node needs, and all of them in start order."""

    rescuer: Rescuer
    controls: Controls
    poller: Poller
    reconciler: Reconciler
    leader: Leader
    all: list[Duty[Any]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        ctx: DutyContext,
        config: Config,
        *,
        queues: QueueSet,
        gate: ClaimGate,
        healthy_since: Callable[[], float | None],
    ) -> Roster:
        hb = config.heartbeat_interval
        roster = cls(
            rescuer=Rescuer(
                ctx, RescuerConfig(interval=hb, rescue_after=config.rescue_after), healthy_since=healthy_since
            ),
            controls=Controls(ctx, ControlsConfig(), queues=queues),
            poller=Poller(ctx, PollerConfig(interval=config.poll_interval), queues=queues),
            reconciler=Reconciler(ctx, ReconcilerConfig(), queues=queues, gate=gate),
            leader=Leader(ctx, LeaderConfig(interval=max(1.0, hb), ttl=max(3.0, hb * 3))),
        )
        roster.all = [
            roster.rescuer,
            Stager(ctx, StagerConfig(interval=config.stage_interval)),
            roster.controls,
            roster.poller,
            roster.reconciler,
        ]
        if config.leadership:
            roster.all += [roster.leader, UniqueSweep(ctx, UniqueSweepConfig())]
            if config.prune_after:
                roster.all.append(
                    Pruner(ctx, PrunerConfig(interval=config.prune_interval, max_age=config.prune_after))
                )
            if config.vacuum_interval:
                roster.all.append(
                    Vacuum(
                        ctx, VacuumConfig(interval=config.vacuum_interval, threshold=config.vacuum_threshold)
                    )
                )
        tasks = load_tasks(config)
        if tasks:  # on every node that has tasks: each tick's unique key makes the others' inserts no-ops
            cron = SchedulerConfig(max_args_bytes=config.max_args_bytes, chunk_size=config.insert_chunk_size)
            roster.all.append(Scheduler(ctx, cron, tasks=tasks))
        return roster
