"""A node's maintenance duties, one module each.

=================  ===========  ========================================================================
duty               runs on      does
=================  ===========  ========================================================================
``lifeline``       every node   heartbeats from a thread of its own; the lease guard stops running jobs
                                when the lease has run out (not a :class:`Duty`: it must outlive a
                                blocked event loop)
``rescuer``        every node   puts back jobs of processes that stopped heartbeating
``stager``         every node   makes due scheduled/retryable jobs available
``poller``         every node   wakes producers whose queues have jobs (the missed-NOTIFY fallback)
``reconciler``     every node   puts back claims no producer holds; finds missed cancel requests
``controls``       every node   applies stored pause/resume/scale controls
``leader``         every node   holds or contends for the leader lease
``pruner``         leader       deletes old finished jobs
``unique_sweep``   leader       clears stale unique keys, settles parked rows
``vacuum``         leader       vacuums the jobs table past a dead-tuple threshold
``scheduler``      with tasks   enqueues recurring (cron) tasks, once per tick (the unique key dedupes)
=================  ===========  ========================================================================

Each :class:`~.duty.Duty` has a frozen, validated config, a public ``run_once()`` and the shared
:class:`~.periodic.Periodic` lifecycle. :class:`~oban_py.runtime.node.Node` builds them from the
:class:`~oban_py.config.Config` and supervises them.
"""

from .controls import Controls, ControlsConfig
from .duty import Duty, DutyConfig, DutyContext
from .leader import Leader, LeaderConfig
from .lifeline import LeaseGuard, Lifeline
from .periodic import Periodic
from .poller import Poller, PollerConfig
from .pruner import Pruner, PrunerConfig
from .reconciler import Reconciler, ReconcilerConfig
from .rescuer import Rescuer, RescuerConfig
from .scheduler import Scheduler, SchedulerConfig
from .stager import Stager, StagerConfig
from .unique_sweep import UniqueSweep, UniqueSweepConfig
from .vacuum import Vacuum, VacuumConfig

__all__ = [
    "Controls",
    "ControlsConfig",
    "Duty",
    "DutyConfig",
    "DutyContext",
    "Leader",
    "LeaderConfig",
    "LeaseGuard",
    "Lifeline",
    "Periodic",
    "Poller",
    "PollerConfig",
    "Pruner",
    "PrunerConfig",
    "Reconciler",
    "ReconcilerConfig",
    "Rescuer",
    "RescuerConfig",
    "Scheduler",
    "SchedulerConfig",
    "Stager",
    "StagerConfig",
    "UniqueSweep",
    "UniqueSweepConfig",
    "Vacuum",
    "VacuumConfig",
]
