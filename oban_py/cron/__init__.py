"""Recurring (cron) tasks: schedules, tasks from oban.toml and decorators, the scheduler pass.

``schedule`` parses expressions (croniter) in a timezone; ``task`` holds a task's config and the
checked task; ``registry`` collects the tasks of a process; ``scheduler`` is one pass, the clock a
parameter. The periodic duty that runs passes is :mod:`oban_py.runtime.maintenance.scheduler`, the
facade methods :mod:`oban_py.api.cron`. See ``docs/recurring.md``.
"""

from .registry import load_tasks, register_cron, registered_cron
from .schedule import Schedule
from .scheduler import CRON_UNIQUE, due_ticks, run_pass
from .task import CronTask, CronTaskConfig

__all__ = [
    "CRON_UNIQUE",
    "CronTask",
    "CronTaskConfig",
    "Schedule",
    "due_ticks",
    "load_tasks",
    "register_cron",
    "registered_cron",
    "run_pass",
]
