"""oban_py: an asyncio job engine backed by PostgreSQL.

Define workers with :func:`worker` (classes) or :func:`job` (functions), insert jobs with
``await oban.insert(...)`` / ``insert_all``, and run queues with ``async with Oban(queues=...)`` or the
``oban-py start`` runner. See docs/ for guides.
"""

from ._version import __version__
from .config import Config, QueueConfig, load_config
from .hooks.callbacks import Outcome
from .job import Cancel, Job, JobState, Record, Snooze
from .job_query import JobFilter, JobPage
from .oban import Oban
from .runtime.execution import Interrupted, current_job, stop_requested
from .unique import UniqueOptions
from .worker import Worker, job, worker

__all__ = [
    "Cancel",
    "Config",
    "Interrupted",
    "Job",
    "JobFilter",
    "JobPage",
    "JobState",
    "Oban",
    "Outcome",
    "QueueConfig",
    "Record",
    "Snooze",
    "UniqueOptions",
    "Worker",
    "__version__",
    "current_job",
    "job",
    "load_config",
    "stop_requested",
    "worker",
]
